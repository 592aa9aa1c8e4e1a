"""What the oracle-pin tests share: the tiny models the official code ran, the oracles' seeded images, the fixtures
(tests/fixtures/*.npz with a json ``meta``) and the QDrop family's run on them. A plain module (no tests in it)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ptq_bench.calibration import image_calibration
from ptq_bench.compare import calibrate_and_reconstruct as official_order

FIXTURES = Path(__file__).parent / "fixtures"
#: the tiny ViT of the pin fixtures (same architecture in timm 0.4.12, which the official code runs on)
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
#: the tiny Swin of the Swin pins: windows of 4 on 16x16 and 8x8 tokens, shifted in every second block, one patch
#: merging
TINY_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2), num_classes=10)
#: the images both tiny models take
IMAGE_SHAPE = (3, 32, 32)


def seeded_state_dict(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights from a seeded generator, independent of timm's init (so they survive timm upgrades)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in sorted(model.state_dict().items()):
        noise = torch.randn(tensor.shape, generator=g)
        if "norm" in name and name.endswith(".weight"):
            state[name] = 1.0 + 0.3 * noise
        elif name.endswith(".bias"):
            state[name] = 0.1 * noise
        elif tensor.ndim >= 2 and name.endswith(".weight"):
            state[name] = noise / math.sqrt(tensor[0].numel())
        else:  # cls_token, pos_embed
            state[name] = 0.02 * noise
    return state


def synthetic_batch(seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The oracles' input convention (shared/oracles/_oracle_common.py): seeded N(0, 1) images."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def tiny_vit() -> nn.Module:
    """The tiny ViT with :func:`seeded_state_dict`'s weights, in eval mode."""
    model = VisionTransformer(**TINY_VIT)
    model.load_state_dict(seeded_state_dict(model))
    return model.eval()


def tiny_swin(seeded: bool = False) -> nn.Module:
    """The tiny Swin with timm's init after ``torch.manual_seed(0)`` (the AdaLog Swin pin's weights), or with
    :func:`seeded_state_dict`'s larger weights."""
    torch.manual_seed(0)
    model = SwinTransformer(**TINY_SWIN)
    if seeded:
        model.load_state_dict(seeded_state_dict(model))
    return model.eval()


def load_fixture(name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A pin fixture's arrays and its ``meta``."""
    with np.load(FIXTURES / name) as z:
        fixture = {k: z[k] for k in z.files}
    return fixture, json.loads(str(fixture["meta"]))


@dataclass(frozen=True)
class OracleBatches:
    """The images of an oracle run: calibration, reconstruction (None where the run has none) and evaluation."""

    calib: torch.Tensor
    optim: torch.Tensor | None
    eval: torch.Tensor


def oracle_batches(meta: dict[str, Any]) -> OracleBatches:
    """The oracles' images from a fixture's meta: ``calib_size`` at ``seed + 1000``, ``eval_size`` at ``seed + 2000``
    and, where the meta has an ``optim_size``, that many reconstruction images at ``seed + 3000``."""
    seed = meta["seed"]
    optim = synthetic_batch(seed + 3000, meta["optim_size"], IMAGE_SHAPE) if "optim_size" in meta else None
    return OracleBatches(synthetic_batch(seed + 1000, meta["calib_size"], IMAGE_SHAPE), optim,
                         synthetic_batch(seed + 2000, meta["eval_size"], IMAGE_SHAPE))


def quantize_and_evaluate(method: Any, model: nn.Module, batches: OracleBatches) -> torch.Tensor:
    """A calibration-only run on the oracle's sets, without autograd: ``method.quantize`` on ``batches.calib``, then
    the quantized logits on ``batches.eval``."""
    with torch.no_grad():
        method.quantize(model, image_calibration(batches.calib))
        return model(batches.eval)


def calibrate_and_reconstruct(method: Any, model: nn.Module, batches: OracleBatches, reseed: int,
                              after_prepare: Callable[[nn.Module, nn.Module], None] | None = None) -> torch.Tensor:
    """:func:`ptq_bench.compare.calibrate_and_reconstruct` on the oracle's sets; the quantized logits on
    ``batches.eval``."""
    assert batches.optim is not None, "the fixture has no reconstruction set (optim_size)"
    official_order(method, model, batches.calib, batches.optim, reseed, after_prepare)
    with torch.no_grad():
        return model(batches.eval)


def assert_weights_equal(model: nn.Module, fixture: dict[str, np.ndarray], count: int) -> None:
    """Every weight the official run changed (``q_weight/*`` of the fixture) equals ours bit for bit."""
    state = model.state_dict()
    weights = [k[len("q_weight/"):] for k in fixture if k.startswith("q_weight/")]
    assert len(weights) == count
    for name in weights:
        assert torch.equal(state[name], torch.from_numpy(fixture[f"q_weight/{name}"])), name
