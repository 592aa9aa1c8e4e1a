"""The evaluation transform: timm's pretrained config of the model, overridden by the data config."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from timm.data import create_transform, resolve_data_config
from torch import nn

#: data-config keys that override timm's resolved data config (None = keep the model's).
OVERRIDES = {"img_size": "input_size", "mean": "mean", "std": "std", "crop_pct": "crop_pct", "interpolation": "interpolation"}


def eval_transform_config(model: nn.Module, data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm's ``resolve_data_config`` for ``model`` (crop_pct, interpolation, mean/std) with user overrides."""
    config = resolve_data_config({}, model=model)
    channels = int(data_cfg.get("channels") or 3)
    for key, timm_key in OVERRIDES.items():
        value = data_cfg.get(key)
        if value is None:
            continue
        if key == "img_size":
            config["input_size"] = (channels, int(value), int(value))
        elif key in ("mean", "std"):
            config[timm_key] = tuple(float(v) for v in value)
        else:
            config[timm_key] = value
    native_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if data_cfg.get("img_size") is None and native_size is not None:
        # a model built directly (no timm pretrained config) takes its own input size, not timm's 224 default
        config["input_size"] = (channels, *tuple(native_size))
    config["input_size"] = (channels, *config["input_size"][1:])
    return config


def eval_transform(model: nn.Module, data_cfg: Mapping[str, Any]) -> tuple[Callable, dict[str, Any]]:
    config = eval_transform_config(model, data_cfg)
    return create_transform(**config, is_training=False), config
