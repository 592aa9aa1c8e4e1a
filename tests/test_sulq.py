"""SULQ (I&S-ViT's shift-uniform-log2 post-Softmax quantizer): the grid by hand, placement as a post-Softmax
quantizer, and equality with the official class on seeded attention maps (tests/fixtures/sulq_official.npz, made by
oracles/sulq_oracle.py from zysxmu/IaS-ViT @ 9300cea)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pins import FIXTURES, synthetic_batch, tiny_vit

from ptq_bench.calibration import image_calibration
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.quant import QUANTIZERS
from ptq_bench.quant.sulq import SulqQuantizer

FIXTURE = FIXTURES / "sulq_official.npz"


def test_grid_by_hand() -> None:
    """η = 0.5, log2 range [-1, 1], 2 bits: step 0.5, codes 0..4 → exponents round(-1, -0.5, 0, 0.5, 1) = -1, -0, 0, 0, 1
    (half to even) → levels 2^e - 0.5 = 0, 0.5, 1.5."""
    q = SulqQuantizer(2)
    q.shift, q.log_min, q.log_max = torch.tensor(0.5), torch.tensor(-1.0), torch.tensor(1.0)
    q.calibrated = True
    assert torch.equal(q.export().levels, torch.tensor([0.0, 0.5, 1.5]))
    # x = 0.3: log2(0.8) = -0.32 -> code round(1.36) = 1 -> exponent round(-0.5) = 0 -> 0.5
    assert torch.equal(q(torch.tensor([0.0, 0.3, 1.4])), torch.tensor([0.0, 0.5, 1.5]))
    assert q.learnable_parameters() == {} and q.capabilities == {"post_softmax", "log_domain"}


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_matches_official_quantizer(bits: int) -> None:
    """Shift, log-domain range, outputs on the calibration and another map, and the straight-through input gradient
    equal the official class's bit for bit."""
    with np.load(FIXTURE) as z:
        f = {k[len(f"w{bits}/"):]: torch.from_numpy(z[k]) for k in z.files if k.startswith(f"w{bits}/")}
    q = QUANTIZERS.get("sulq")(bits)
    q.calibrating = True
    with torch.no_grad():
        out_calib = q(f["calib"])
    q.calibrating = False
    evalx = f["eval"].clone().requires_grad_(True)
    out_eval = q(evalx)
    (out_eval * f["weights"]).sum().backward()
    assert torch.equal(q.shift, f["delta"]) and torch.equal(q.log_min, f["minv"]) and torch.equal(q.log_max, f["maxv"])
    assert torch.equal(out_calib, f["out_calib"]) and torch.equal(out_eval.detach(), f["out_eval"])
    assert torch.equal(evalx.grad, f["grad_eval"])


def test_repq_vit_takes_sulq_on_the_post_softmax_map() -> None:
    model = tiny_vit()
    build_method("repq_vit", BitWidth(4, 4), softmax_quantizer="sulq").quantize(model, image_calibration(synthetic_batch(0, 2, (3, 32, 32))))
    quantizer = model.blocks[0].attn.matmul2.quantizer_a
    assert isinstance(quantizer, SulqQuantizer) and quantizer.calibrated and quantizer.shift.item() in torch.tensor(quantizer.options.shifts).tolist()
