"""The evaluation transform, overridden by the data config.

A model from timm's zoo (its ``pretrained_cfg`` names a weights source) keeps timm's transform for that config
(crop_pct, interpolation, mean/std). Any other model gets its own input: ``data.channels`` and ``data.img_size``
default to the model's (``in_chans`` or ``patch_embed.proj.in_channels``; ``patch_embed.img_size``) and are
checked against it when set, and there is no crop (crop_pct 1.0) unless ``data.crop_pct`` asks for one; the
first image that the transform resizes or crops is logged once, with its size and the size it becomes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from typing import Any, Callable, Mapping, MutableMapping

from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision import transforms

from ptq_bench.errors import ConfigError

log = logging.getLogger(__name__)

#: data-config keys that override timm's resolved data config (None = keep the model's).
OVERRIDES = {"img_size": "input_size", "mean": "mean", "std": "std", "crop_pct": "crop_pct", "interpolation": "interpolation"}
#: pretrained_cfg keys that name where a timm zoo model's weights come from.
WEIGHT_SOURCES = ("url", "hf_hub_id", "file")


def has_pretrained_cfg(model: nn.Module) -> bool:
    """Whether ``model`` carries a timm zoo pretrained config (one naming a weights source)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return any(pretrained_cfg.get(key) for key in WEIGHT_SOURCES)


def model_channels(model: nn.Module) -> int | None:
    """The input channels the model declares (``in_chans``, else its patch embedding's conv), or None."""
    channels = getattr(model, "in_chans", None)
    if channels is None:
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        channels = getattr(proj, "in_channels", None)
    return int(channels) if isinstance(channels, int) else None


def model_img_size(model: nn.Module) -> tuple[int, int] | None:
    """The (height, width) the model's patch embedding was built for, or None."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) and len(size) == 2 else None


def accepts_any_size(model: nn.Module) -> bool:
    """timm models built with ``dynamic_img_size`` or ``strict_img_size=False`` take other input sizes."""
    patch_embed = getattr(model, "patch_embed", None)
    return bool(getattr(model, "dynamic_img_size", False)) or not getattr(patch_embed, "strict_img_size", True)


def as_size(value: Any) -> tuple[int, int]:
    """``data.img_size`` (an int or [height, width]) as (height, width)."""
    if isinstance(value, int):
        return (value, value)
    height, width = (int(v) for v in value)
    return (height, width)


def resolve_input_shape(model: nn.Module, data_cfg: MutableMapping[str, Any]) -> None:
    """Set null ``data.channels``/``data.img_size`` to the model's (in place); check set values against it."""
    own_channels, own_size = model_channels(model), model_img_size(model)
    if data_cfg.get("channels") is None:
        if own_channels is None:
            raise ConfigError("data.channels is null and the model declares no in_chans: set data.channels")
        data_cfg["channels"] = own_channels
    elif own_channels is not None and int(data_cfg["channels"]) != own_channels:
        raise ConfigError(f"data.channels={data_cfg['channels']} does not match the model's in_chans {own_channels}")
    if data_cfg.get("img_size") is None:
        if own_size is None:
            raise ConfigError("data.img_size is null and the model declares no patch_embed.img_size: set data.img_size")
        data_cfg["img_size"] = own_size[0] if own_size[0] == own_size[1] else list(own_size)
    elif own_size is not None and not accepts_any_size(model) and as_size(data_cfg["img_size"]) != own_size:
        size = data_cfg["img_size"]
        raise ConfigError(f"data.img_size={size} does not match the model's input size {own_size[0]}x{own_size[1]}")


def eval_transform_config(model: nn.Module, data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm's ``resolve_data_config`` for ``model`` (crop_pct, interpolation, mean/std) with user overrides."""
    config = resolve_data_config({}, model=model)
    if not has_pretrained_cfg(model):
        config["crop_pct"] = 1.0
    channels = int(data_cfg.get("channels") or 3)
    for key, timm_key in OVERRIDES.items():
        value = data_cfg.get(key)
        if value is None:
            continue
        if key == "img_size":
            config["input_size"] = (channels, *as_size(value))
        elif key in ("mean", "std"):
            config[timm_key] = tuple(float(v) for v in value)
        else:
            config[timm_key] = value
    native_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if data_cfg.get("img_size") is None and native_size is not None:
        config["input_size"] = (channels, *tuple(native_size))
    config["input_size"] = (channels, *config["input_size"][1:])
    return config


def check_normalization(config: Mapping[str, Any]) -> None:
    """mean/std need one value per input channel (timm's defaults are ImageNet's three)."""
    channels = config["input_size"][0]
    for key in ("mean", "std"):
        if len(config[key]) != channels:
            count = len(config[key])
            raise ConfigError(f"data.{key} has {count} values for {channels} input channel(s): set data.{key}")


class ResizeNotice:
    """First step of the transform of a model without a pretrained config: passes images through and logs, once
    across DataLoader workers, the first one that the following resize/crop changes (its size and the result)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.crop = tuple(config["input_size"][1:])
        self.crop_pct = float(config["crop_pct"])
        self.scale = tuple(math.floor(x / self.crop_pct) for x in self.crop)
        self.warned = multiprocessing.RawValue("b", 0)  # shared with forked/spawned workers

    def __call__(self, image: Image.Image) -> Image.Image:
        if not self.warned.value and (self.scale != self.crop or image.size[::-1] != self.crop):
            self.warned.value = 1
            width, height = image.size
            log.warning("eval transform: %dx%d images are resized (shorter side %d) and center-cropped to %dx%d "
                        "(data.img_size=%s, data.crop_pct=%g)", width, height, min(self.scale), self.crop[1],
                        self.crop[0], self.crop[0] if self.crop[0] == self.crop[1] else list(self.crop), self.crop_pct)
        return image


def eval_transform(model: nn.Module, data_cfg: MutableMapping[str, Any]) -> tuple[Callable, dict[str, Any]]:
    """The transform and its config; for a model without a pretrained config, ``data_cfg``'s null ``channels`` and
    ``img_size`` are set to the model's first (see :func:`resolve_input_shape`)."""
    if has_pretrained_cfg(model):
        config = eval_transform_config(model, data_cfg)
        return create_transform(**config, is_training=False), config
    resolve_input_shape(model, data_cfg)
    config = eval_transform_config(model, data_cfg)
    check_normalization(config)
    return transforms.Compose([ResizeNotice(config), create_transform(**config, is_training=False)]), config
