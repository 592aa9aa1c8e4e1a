"""FIMA-Q: option refusals and a pin of the whole reconstruction (Fisher refreshes included) against the official code
(tests/fixtures/fimaq_tiny_w4a4_it4.npz, ShiheWang/FIMA-Q @ 64c4b00)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_repq_vit import synthetic_batch, tiny_vit

from ptq_bench.calibration import image_calibration
from ptq_bench.compare import qparam_diffs, weight_diffs
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.methods.qdrop import fp_copy

FIXTURES = Path(__file__).parent / "fixtures"


def test_options_refused() -> None:
    with pytest.raises(ConfigError, match="option k"):
        build_method("fima_q", BitWidth(4, 4), k=0)
    with pytest.raises(ConfigError, match="iters must be 0 or >= k"):
        build_method("fima_q", BitWidth(4, 4), iters=3, k=5)
    with pytest.raises(ConfigError, match="temp"):
        build_method("fima_q", BitWidth(4, 4), temp=0.0)


def _run(fixture_name: str, **options: object) -> tuple[dict[str, np.ndarray], torch.nn.Module, torch.Tensor]:
    """The fixture, and our model after calibration and reconstruction on its images with its FP weights."""
    with np.load(FIXTURES / fixture_name) as z:
        fixture = {k: z[k] for k in z.files}
    meta = json.loads(str(fixture["meta"]))
    model = tiny_vit()
    model.load_state_dict({k[len("fp_weight/"):]: torch.from_numpy(v) for k, v in fixture.items() if k.startswith("fp_weight/")})
    calib = synthetic_batch(meta["seed"] + 1000, meta["calib_size"], (3, 32, 32))
    optim = synthetic_batch(meta["seed"] + 3000, meta["optim_size"], (3, 32, 32))
    evalx = synthetic_batch(meta["seed"] + 2000, meta["eval_size"], (3, 32, 32))
    method = build_method("fima_q", BitWidth(meta["w_bits"], meta["a_bits"]), iters=meta["iters"], k=meta["k"], **options)
    fp = fp_copy(model)
    method.calibrate_(model, image_calibration(calib))
    method.reconstruct(model, fp, image_calibration(optim), torch.Generator().manual_seed(meta["reseed"]))
    with torch.no_grad():
        logits = model(evalx)
    return fixture, model, logits


def test_reconstruction_matches_official_code_on_tiny_vit() -> None:
    """configs/4bit/best.py with token_channel_wise off and k = 2 (calibration on 4 images, reconstruction on 8, 4
    steps per unit: Fisher refreshes at steps 0 and 2 of the patch embedding and both blocks; generator seeded 7
    before the reconstruction, the official clamp gradient of torch <= 2.13): the 22 weights the fold and the
    rounding changed and the quantized logits equal the official run's bit for bit; 47 of 54 quantizer tensors too, the 7 learned activation scales within
    1e-6 relative (a float step: the fused straight-through gradient rounds otherwise than autograd's chain)."""
    fixture, model, logits = _run("fimaq_tiny_w4a4_it4.npz", token_wise=False)
    diffs = qparam_diffs(model, fixture, ("patch_embed.proj.a_quantizer.",))
    assert len(diffs) == 54 and sum(d.max_abs == 0 for d in diffs) >= 47
    assert max(d.max_rel for d in diffs) < 1e-6
    weights = weight_diffs(model, fixture)
    assert len(weights) == 22 and max(d.max_abs for d in weights) == 0.0  # the tensors the fold and rounding changed
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


def test_token_wise_scales_match_official_code_on_tiny_vit() -> None:
    """The configs' token_channel_wise (k = 2, else as above): every scale has the official shape (per token for the
    Linear inputs, per head and row/column for the matmul operands), the 22 weights are identical, 40 of 54
    quantizer tensors too; the learned per-token scales differ by float steps grown by Adam (max 7.2e-4 relative,
    the first block's attention-map scale: the straight-through gradient summed over the broadcast dimensions in
    another order), which moves the logits by up to 0.043."""
    fixture, model, logits = _run("fimaq_tcw_tiny_w4a4_it4.npz")
    diffs = qparam_diffs(model, fixture, ("patch_embed.proj.a_quantizer.",))
    assert len(diffs) == 54 and sum(d.max_abs == 0 for d in diffs) >= 40
    assert max(d.max_rel for d in diffs) < 1e-3
    weights = weight_diffs(model, fixture)
    assert len(weights) == 22 and max(d.max_abs for d in weights) == 0.0
    assert (logits - torch.from_numpy(fixture["logits/q"])).abs().max().item() < 0.05


def test_task_without_logits_refused() -> None:
    data = dataclasses.replace(image_calibration(torch.zeros(2, 3, 32, 32)), logits=False)
    with pytest.raises(ConfigError, match="class logits"):
        build_method("fima_q", BitWidth(4, 4), iters=5).quantize(tiny_vit(), data)
