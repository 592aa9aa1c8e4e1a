"""FIMA-Q's block reconstruction loss: a diagonal-plus-low-rank (DPLR) Fisher approximation of the KL distillation
loss (FIMA-Q, CVPR 2025, §3; ShiheWang/FIMA-Q @ 64c4b00, ``utils/block_recon.py``: ``LossFunction`` with
``rec_loss='fisher_dplr'`` and ``BlockReconstructor.new_fisher_ro``).

The Fisher of the block output O is built from k refreshes. At each one the quantized model's block output Ô is
compared with the FP one over the calibration set: a row g of mean |∂KL/∂O| (KL of the FP to the quantized
temperature-softmax, back-propagated to the block output) and a row d of mean |Ô − O|. With G (k×N) and D (k×N)
stacking them and B = D·Dᵀ, for a batch of differences Δ = |Ô − O| (one row of N per sample):

    low_rank = mean_n (Δ_n Gᵀ) B⁻¹ (Δ_n Gᵀ)ᵀ        diagonal = mean_{n,i} Δ_{n,i}² · mean_k G_{k,i}

and the loss is p1·low_rank/low_rank₀ + p2·diagonal/diagonal₀, each divided by its value at the first call after
the latest refresh (the official ``init_loss_1``/``init_loss_2``). Only the loss and the refresh's algebra live here;
the reconstruction loop computes the refresh statistics.
"""

from __future__ import annotations

from typing import Optional

import torch


class FisherDPLRLoss:
    """The DPLR Fisher loss of one block; :meth:`refresh` adds a rank (a Fisher row and an output-delta row)."""

    def __init__(self, p1: float = 1.0, p2: float = 1.0) -> None:
        self.p1, self.p2 = p1, p2
        self.grads: Optional[torch.Tensor] = None  # G, (k, N)
        self.deltas: Optional[torch.Tensor] = None  # D, (k, N)
        self.inverse_b: Optional[torch.Tensor] = None  # (D·Dᵀ)⁻¹, (k, k)
        self._scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the normalizers; None: set at next call

    @property
    def rank(self) -> int:
        return 0 if self.grads is None else int(self.grads.shape[0])

    def refresh(self, grad: torch.Tensor, delta: torch.Tensor) -> None:
        """Append the rows ``grad`` = mean |∂KL/∂O| and ``delta`` = mean |Ô − O| (each N values, per-sample means
        over the calibration set) and renew (D·Dᵀ)⁻¹; the next call re-normalizes both terms."""
        grad, delta = grad.reshape(1, -1).abs(), delta.reshape(1, -1)
        self.grads = grad if self.grads is None else torch.cat([self.grads, grad])
        self.deltas = delta if self.deltas is None else torch.cat([self.deltas, delta])
        self.inverse_b = torch.linalg.inv(self.deltas @ self.deltas.transpose(1, 0))
        self._scales = None

    def terms(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low_rank, diagonal) of a batch, before normalization."""
        if self.grads is None or self.inverse_b is None:
            raise RuntimeError("FisherDPLRLoss needs a refresh before its first use")
        difference = (output - target).abs().reshape(output.shape[0], -1)
        projected = difference.unsqueeze(1) @ self.grads.transpose(0, 1)  # (B, 1, k)
        low_rank = (projected @ self.inverse_b @ projected.transpose(1, 2)).mean()
        diagonal = (difference.pow(2) * self.grads.mean(dim=0)).mean()
        return low_rank, diagonal

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        low_rank, diagonal = self.terms(output, target)
        if self._scales is None:
            self._scales = (low_rank.detach(), diagonal.detach())
        return self.p1 * low_rank / self._scales[0] + self.p2 * diagonal / self._scales[1]
