"""Build the FP model from its Hydra config and load its checkpoint, recording the weights' identity.

A model config names a builder through Hydra ``_target_`` (``timm.create_model`` with a timm name for the
zoo models, or any callable returning a timm ViT/DeiT/Swin-style module) and, optionally, ``checkpoint``: a local
timm state dict (.pth/.pt/.bin via ``torch.load(weights_only=True)``, or .safetensors).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import hydra
import torch
from hydra.errors import InstantiationException
from torch import nn

from ptq_bench.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
#: Keys under which training frameworks nest the state dict (timm/DeiT "model", others "state_dict").
NESTED_KEYS = ("model", "state_dict", "model_ema")


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the FP weights: where they came from and their content hash."""

    name: str
    checkpoint: Optional[str]
    weights_sha256: str
    num_params: int
    random_init: bool  # neither a checkpoint nor pretrained weights: accuracy is meaningless, fidelity is not


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors_sha256(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for key, value in items:
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """Content hash of a state dict (names, shapes and values), for weights not loaded from a file."""
    return _tensors_sha256(sorted(model.state_dict().items()))


def parameters_sha256(model: nn.Module) -> str:
    """Content hash of a model's parameters (buffers such as quantizer state excluded)."""
    return _tensors_sha256(model.named_parameters())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch pickle (tensors only), unwrapping ``model``/``state_dict``."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"unsupported checkpoint type '{path.suffix}' (expected {', '.join(CHECKPOINT_SUFFIXES)})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any parse failure is the file's fault, not ours
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}") from None
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in NESTED_KEYS if k in state), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"checkpoint {path} holds no state dict")
    return dict(state)


def load_checkpoint_(model: nn.Module, path: Path) -> None:
    """Load ``path`` strictly; a mismatch raises one line naming the first offending keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def build_model(cfg: Mapping[str, Any]) -> tuple[nn.Module, ModelInfo]:
    """Instantiate ``cfg.builder``, load ``cfg.checkpoint`` if given; returns the model in eval mode and its info."""
    try:
        model = hydra.utils.instantiate(cfg["builder"])
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, RuntimeError) and "Unknown model" in str(cause):
            raise ConfigError(f"unknown timm model in model '{cfg['name']}': {cause}") from None
        raise ConfigError(f"cannot build model '{cfg['name']}': {str(cause).splitlines()[0]}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model builder for '{cfg['name']}' returned {type(model).__name__}, not an nn.Module")
    checkpoint = cfg.get("checkpoint")
    if checkpoint:
        path = Path(str(checkpoint)).expanduser()
        load_checkpoint_(model, path)
        sha = file_sha256(path)
    else:
        sha = state_dict_sha256(model)
    random_init = not checkpoint and not cfg.get("pretrained")
    if random_init:
        log.warning("model '%s' has random weights (no model.checkpoint, model.pretrained=false): top-1 is not "
                    "comparable with published numbers", cfg["name"])
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    info = ModelInfo(str(cfg["name"]), str(checkpoint) if checkpoint else None, sha, num_params, random_init)
    return model, info
