"""Build the FP model from its Hydra config and load its checkpoint, recording the weights' identity.

A model config names a builder through Hydra ``_target_`` (``timm.create_model`` with a timm name for the
zoo models, or any callable returning a timm ViT/DeiT/Swin-style module) and, optionally, ``checkpoint``: a local
timm state dict (.pth/.pt/.bin via ``torch.load(weights_only=True)``, or .safetensors; ``~`` and ``$VAR`` expand).
``weights: builder`` says that the builder loaded trained weights itself (the model is not random-init).
"""

from __future__ import annotations

import hashlib
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import hydra
import torch
from hydra.errors import InstantiationException
from torch import nn

from ptq_bench.paths import expand_path
from ptq_bench.errors import CheckpointError, ConfigError, NumericalError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # the order model.checkpoint_dir looks in
#: Keys under which training frameworks nest the state dict (timm/DeiT "model", others "state_dict").
NESTED_KEYS = ("model", "state_dict", "model_ema")
#: Values of ``model.weights``: null (a checkpoint, ``pretrained`` or random init) or ``builder``.
WEIGHTS_SOURCES = (None, "builder")
IMPORTABLE_HINT = "the builder's module must be importable: an installed package or a folder on PYTHONPATH"


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the FP weights: where they came from and their content hash."""

    name: str
    checkpoint: Optional[str]
    weights_sha256: str
    num_params: int
    random_init: bool  # neither a checkpoint nor pretrained weights: accuracy is meaningless, fidelity is not


def _tensors_sha256(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for key, value in items:
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """Content hash of a state dict (names, shapes and values), for weights not loaded from a file."""
    return _tensors_sha256(sorted(model.state_dict().items()))


def parameters_sha256(model: nn.Module) -> str:
    """Content hash of a model's parameters (buffers such as quantizer state excluded)."""
    return _tensors_sha256(model.named_parameters())


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of .safetensors or a torch pickle (tensors only; ``model``/``state_dict`` unwrapped) and the
    sha256 of the file, from one read: the hash is of the very bytes loaded, and a Swin-B or Cascade Mask R-CNN
    checkpoint (hundreds of MB) is not read twice."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"unsupported checkpoint type '{path.suffix}' (expected {', '.join(CHECKPOINT_SUFFIXES)})")
    content = path.read_bytes()
    sha256 = hashlib.sha256(content).hexdigest()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            state = load(content)
        else:
            state = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # any parse failure is the file's fault, not ours
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}") from None
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in NESTED_KEYS if k in state), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"checkpoint {path} holds no state dict")
    return dict(state), sha256


def load_checkpoint_(model: nn.Module, path: Path) -> str:
    """Load ``path`` strictly and return its sha256; a mismatch raises one line naming the first offending keys."""
    state, sha256 = read_checkpoint(path)
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
    for key, value in state.items():
        if own[key].is_floating_point() and not value.is_floating_point():
            raise CheckpointError(
                f"checkpoint {path}: '{key}' is {str(value.dtype).removeprefix('torch.')} where the model has "
                f"{str(own[key].dtype).removeprefix('torch.')} (convert the checkpoint to floating point first)"
            )
    model.load_state_dict(state, strict=True)
    return sha256


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def import_reason(target: str, cause: BaseException) -> str:
    """Why Hydra could not import ``target``: a missing module (with how to make it importable), a missing name
    in an imported module, or the error raised while importing it."""
    missing = cause.name if isinstance(cause, ModuleNotFoundError) else None
    if missing and (target == missing or target.startswith(missing + ".")):
        parent, _, child = missing.rpartition(".")
        if parent in sys.modules:
            return f"'{parent}' has no attribute or submodule '{child}'"
        return f"no module named '{missing}'; {IMPORTABLE_HINT}"
    return first_line(cause)


def builder_error(cfg: Mapping[str, Any], error: InstantiationException) -> ConfigError:
    """One line for a builder that cannot be imported or fails: the target, and the underlying cause."""
    cause = error.__cause__ or error
    if str(error).startswith("Error locating target"):
        target = str(cfg["builder"].get("_target_"))
        cause = cause.__cause__ or cause  # Hydra wraps the import error in an ImportError of its own
        reason = import_reason(target, cause)
        return ConfigError(f"cannot build model '{cfg['name']}': cannot import builder '{target}': {reason}")
    if isinstance(cause, RuntimeError) and "Unknown model" in str(cause):
        return ConfigError(f"unknown timm model in model '{cfg['name']}': {cause}")
    return ConfigError(f"cannot build model '{cfg['name']}': {first_line(cause)}")


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse weights with NaN or Inf, naming the first tensor that has them."""
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NumericalError(f"weights of {source} contain NaN or Inf (first in '{key}')")


def build_model(cfg: Mapping[str, Any]) -> tuple[nn.Module, ModelInfo]:
    """Instantiate ``cfg.builder``, load ``cfg.checkpoint`` if given; returns the model in eval mode and its info."""
    weights = cfg.get("weights")
    if weights not in WEIGHTS_SOURCES:
        raise ConfigError(f"model.weights={weights}: expected null or builder (the builder loads trained weights)")
    try:
        model = hydra.utils.instantiate(cfg["builder"])
    except InstantiationException as error:
        raise builder_error(cfg, error) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model builder for '{cfg['name']}' returned {type(model).__name__}, not an nn.Module")
    checkpoint = expand_path(cfg["checkpoint"]) if cfg.get("checkpoint") else None
    if checkpoint:
        sha = load_checkpoint_(model, checkpoint)
    else:
        sha = state_dict_sha256(model)
    random_init = not checkpoint and not cfg.get("pretrained") and weights != "builder"
    if random_init:
        log.warning("model '%s' has random weights (no model.checkpoint, model.pretrained=false): top-1 is not "
                    "comparable with published numbers (model.weights=builder if the builder loads trained weights)",
                    cfg["name"])
    check_finite(model, str(checkpoint or cfg["name"]))
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    info = ModelInfo(str(cfg["name"]), str(checkpoint) if checkpoint else None, sha, num_params, random_init)
    return model, info
