"""FIMA-Q's DPLR Fisher reconstruction loss: the rank-1 case by hand, and equality with the official
``LossFunction('fisher_dplr')`` on seeded tensors (ShiheWang/FIMA-Q @ 64c4b00 through oracles/adalog_family_fisher_loss.py,
which regenerates fimaq_loss.npz bit for bit: two refreshes, two calls each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pins import FIXTURES

from ptq_bench.transforms.fisher_loss import FisherDPLRLoss

FIXTURE = FIXTURES / "fimaq_loss.npz"


def test_rank_one_by_hand_and_normalized_at_the_first_call_after_a_refresh():
    g = torch.Generator().manual_seed(0)
    grad, delta = torch.rand(12, generator=g), torch.rand(12, generator=g)
    output, target = torch.randn(3, 2, 6, generator=g), torch.randn(3, 2, 6, generator=g)
    loss = FisherDPLRLoss(p1=1.0, p2=0.5)
    loss.refresh(-grad, delta)  # the Fisher row is taken in absolute value
    difference = (output - target).abs().reshape(3, -1)
    low_rank = ((difference @ grad) ** 2 / (delta @ delta)).mean()
    diagonal = (difference**2 * grad).mean()
    assert torch.allclose(torch.stack(loss.terms(output, target)), torch.stack([low_rank, diagonal]), rtol=1e-6)
    assert loss(output, target).item() == pytest.approx(1.5)  # p1 + p2: each term over its own first value
    assert loss(output * 2, target * 2).item() > 1.5
    loss.refresh(grad, delta.flip(0))
    assert loss.rank == 2 and loss(output * 2, target * 2).item() == pytest.approx(1.5)


def test_equals_the_official_loss_function():
    z = np.load(FIXTURE)
    loss = FisherDPLRLoss()
    compared = 0
    for refresh in range(2):
        loss.refresh(torch.from_numpy(z[f"refresh{refresh}/grad"]), torch.from_numpy(z[f"refresh{refresh}/delta"]))
        assert torch.equal(loss.inverse_b, torch.from_numpy(z[f"refresh{refresh}/inverse_b"]))
        for step in range(2):
            key = f"refresh{refresh}/step{step}"
            value = loss(torch.from_numpy(z[key + "/pred"]), torch.from_numpy(z[key + "/tgt"]))
            assert torch.equal(value, torch.from_numpy(z[key + "/loss"])), key
            compared += 1
    assert compared == 4


def test_use_before_a_refresh_is_an_error():
    with pytest.raises(RuntimeError, match="refresh"):
        FisherDPLRLoss()(torch.zeros(1, 2), torch.zeros(1, 2))
