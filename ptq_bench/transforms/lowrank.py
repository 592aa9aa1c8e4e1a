"""AIQViT's architecture-informed low-rank compensation (AILoC): learnable ΔW = B·A per linear layer.

AIQViT (arXiv 2502.04628), Eq. 9: h = Quant-U(x) · Quant-U(W0 + B·A), W0 frozen, only A and B learned, so the
compensation is merged into the weight *before* quantization (``placement="merged"``, no inference cost). Eq. 11
writes the search forward as a side branch x̂·W0 + Σ_j φ(ᾱ_j x̂ B_j A_j); ``placement="side"`` implements that
literal form (an FP branch next to the fake-quantized weight, kept at inference).

Rank search (Eq. 11-14): one candidate branch per rank r_j ∈ S, mixed with ᾱ = softmax(α) (architecture logits α
per layer, DARTS), each candidate passed through φ = drop-path (FractalNet); after the search r* = argmax_j α_j.
Initialization is not given in the paper: A is Kaiming-uniform and B = 0 (the LoRA default), so a fresh branch
leaves the layer's output unchanged.
"""

from __future__ import annotations

import math
from typing import Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.quant.layers import QuantLinear

Placement = Literal["merged", "side"]


def usable_ranks(candidates: Sequence[int], out_features: int, in_features: int) -> tuple[int, ...]:
    """Candidates not above min(out, in) (a larger rank adds nothing); the largest usable rank if none is."""
    limit = min(out_features, in_features)
    kept = tuple(sorted({int(r) for r in candidates if 0 < int(r) <= limit}))
    return kept or (limit,)


class LowRankBranch(nn.Module):
    """ΔW = Σ_j m_j · ᾱ_j · B_j A_j over candidate ranks (a single candidate: ΔW = B A, no mixing).

    ``drop_mask`` (set by the search loop before each training step, one entry per candidate, already divided
    by the keep probability) implements φ; it is ignored outside training mode.
    """

    def __init__(self, out_features: int, in_features: int, ranks: Sequence[int], generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if not ranks:
            raise ConfigError("a low-rank branch needs at least one candidate rank")
        self.ranks = tuple(int(r) for r in ranks)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for r in self.ranks:
            a = torch.empty(r, in_features)
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=√5), the nn.Linear / LoRA default
            a.uniform_(-bound, bound, generator=generator)
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(out_features, r)))
        self.alpha = nn.Parameter(torch.zeros(len(self.ranks))) if len(self.ranks) > 1 else None
        self.drop_mask: Optional[torch.Tensor] = None

    @property
    def searching(self) -> bool:
        return self.alpha is not None

    def mixing_weights(self) -> torch.Tensor:
        """ᾱ = softmax(α) (Eq. 12); [1] for a single candidate."""
        if self.alpha is None:
            return torch.ones(1, device=self.A[0].device)
        return torch.softmax(self.alpha, dim=0)

    def delta(self) -> torch.Tensor:
        """The compensation ΔW (shape of the layer's weight)."""
        weights = self.mixing_weights()
        if self.training and self.drop_mask is not None:
            weights = weights * self.drop_mask.to(weights.device)
        return sum(w * (b @ a) for w, a, b in zip(weights, self.A, self.B))  # type: ignore[return-value]

    def chosen_rank(self) -> int:
        """r* = argmax_j α_j (Eq. 14's selection; the first candidate on ties)."""
        if self.alpha is None:
            return self.ranks[0]
        return self.ranks[int(self.alpha.detach().argmax())]

    def select(self, warm_start: bool, generator: Optional[torch.Generator] = None) -> "LowRankBranch":
        """A single-candidate branch of rank r*: re-initialized, or warm-started from the searched candidate
        with its mixing weight ᾱ_{r*} folded into B (so it contributes what it did in the mixture)."""
        rank = self.chosen_rank()
        out_features, in_features = self.B[0].shape[0], self.A[0].shape[1]
        branch = LowRankBranch(out_features, in_features, [rank], generator).to(self.A[0].device)
        if warm_start:
            j = self.ranks.index(rank)
            with torch.no_grad():
                branch.A[0].copy_(self.A[j])
                branch.B[0].copy_(self.B[j] * self.mixing_weights()[j])
        return branch

    def resample_drop_path(self, drop_prob: float, generator: torch.Generator) -> None:
        """Draw φ's keep/drop decision of every candidate for the next step (FractalNet drops per mini-batch)."""
        if self.alpha is None or drop_prob <= 0.0:
            self.drop_mask = None
            return
        keep = (torch.rand(len(self.ranks), generator=generator) >= drop_prob).float()
        self.drop_mask = keep / (1.0 - drop_prob)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"


class LowRankQuantLinear(QuantLinear):
    """A :class:`QuantLinear` with a :class:`LowRankBranch` (converted in place; see :func:`attach_lowrank_`).

    merged: y = Q_x(x) · Q_w(W0 + ΔW)ᵀ + b;  side: y = Q_x(x) · Q_w(W0)ᵀ + Q_x(x) · ΔWᵀ + b.
    W0 is frozen (``requires_grad=False``) while the branch exists.
    """

    lowrank: LowRankBranch
    placement: Placement
    weight_requires_grad: bool  # the weight's flag before the branch froze it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = self.quantized_input(x)
        delta = self.lowrank.delta()
        if self.placement == "side":
            return F.linear(x_q, self.quantized_weight(), self.bias) + F.linear(x_q, delta)
        weight = self.weight + delta
        wq = self.weight_quantizer
        if wq is not None and wq.enabled:
            weight = wq(weight)
        return F.linear(x_q, weight, self.bias)


def attach_lowrank_(layer: QuantLinear, branch: LowRankBranch, placement: Placement) -> LowRankQuantLinear:
    """Give ``layer`` the branch (replacing any previous one) and freeze its weight."""
    if placement not in ("merged", "side"):
        raise ConfigError(f"unknown low-rank placement '{placement}' (merged, side)")
    if not isinstance(layer, LowRankQuantLinear):
        layer.weight_requires_grad = layer.weight.requires_grad
    layer.__class__ = LowRankQuantLinear
    layer.lowrank = branch
    layer.placement = placement
    layer.weight.requires_grad_(False)
    return layer  # type: ignore[return-value]


def fold_lowrank_(layer: LowRankQuantLinear) -> QuantLinear:
    """Merged placement: W ← W0 + ΔW and back to a plain :class:`QuantLinear` (deployed weight Q(W0 + BA))."""
    if layer.placement != "merged":
        raise ConfigError("only a merged low-rank branch can be folded into the weight")
    with torch.no_grad():
        layer.weight.add_(layer.lowrank.eval().delta())
    layer.weight.requires_grad_(layer.weight_requires_grad)
    del layer.lowrank, layer.placement, layer.weight_requires_grad
    layer.__class__ = QuantLinear
    layer.refresh_weight()
    return layer


def lowrank_layers(module: nn.Module) -> Iterator[tuple[str, LowRankQuantLinear]]:
    """Every layer of ``module`` that carries a low-rank branch."""
    for name, child in module.named_modules():
        if isinstance(child, LowRankQuantLinear):
            yield name, child


def branch_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Θ: every A_j and B_j in ``module``."""
    return [p for _, layer in lowrank_layers(module) for p in (*layer.lowrank.A, *layer.lowrank.B)]


def architecture_parameters(module: nn.Module) -> list[nn.Parameter]:
    """α of every searching branch in ``module``."""
    return [layer.lowrank.alpha for _, layer in lowrank_layers(module) if layer.lowrank.alpha is not None]
