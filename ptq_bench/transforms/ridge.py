"""ERQ's closed-form error reduction (Zhong et al., ICML 2024, Sec. 4.1 Aqer and 4.2 Wqer), as the official code
computes it (zysxmu/ERQ @ 2f5b4ce test_quant_expand.py ``replace_W``, ``replace_W_afterquant_vector_twopart``).

Notation: a layer's weight with its bias appended as a last column, ``Wb`` (out, in + 1), and its quantized FP
input with a column of ones appended, ``A`` (tokens, in + 1); without a bias neither is appended.

* :func:`activation_error_ridge`: Aqer. The FP output ``Y`` is matched from the quantized input by ridge regression:
  ``β = (AᵀA + λI)⁻¹ Aᵀ (Y - A Wbᵀ)``, ``Wb ← Wb + βᵀ`` (the bias is regularized too).
* :func:`progressive_quantize`: Wqer. Columns are quantized in order, half of the remaining ones per round (the last
  column, the bias or a bias-free layer's last weight column, never): the round's columns take their quantization
  error ``δ₁`` (after :func:`refine_rounding`, where asked) and the still-FP columns absorb it by ridge regression,
  ``δ₂ = -(I₂ᵀI₂ + λI)⁻¹ I₂ᵀI₁ δ₁`` per row, in blocks of ``row_block`` rows.
* :func:`refine_rounding`: per row, up to ``steps`` greedy flips between floor and ceil of the entry whose gradient
  of ``δᵀCδ`` (``C = μμᵀ + Σ`` of the round's input columns, ``torch.cov``) is largest and of the same sign as δ,
  kept while ``δᵀCδ`` does not grow; a block stops when every row's last flip made it grow (or, equivalently, when a
  step changes nothing: the official loop then idles to its cap).

Every product is formed in the official order and layout (inverse, association, transposes), so results are
bit-identical on the same torch. One departure: the official ``.squeeze()`` of the per-row ``δᵀCδ`` makes a block of
a single row (out_features = 1 mod ``row_block``) fail with an index error; here it is a block like any other.
"""

from __future__ import annotations

from typing import Callable

import torch

#: a weight grid with a rounding function: (values, rounding) -> de-quantized values
Grid = Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, k) with a column of ones appended (the bias input)."""
    return torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)), dim=1)


def activation_error_ridge(weight: torch.Tensor, bias: torch.Tensor | None, x_q: torch.Tensor, y_fp: torch.Tensor,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Aqer: the weight and bias that best map the quantized input ``x_q`` (rows, in) to the FP output ``y_fp``
    (rows, out), ridge-regularized towards the current ones."""
    a = with_ones(x_q) if bias is not None else x_q
    w = torch.cat((weight, bias.unsqueeze(1)), dim=1) if bias is not None else weight
    residual = y_fp - (a @ w.T)
    beta = torch.inverse(a.permute(1, 0) @ a + torch.eye(a.shape[1], device=a.device) * lam) @ a.permute(1, 0) @ residual
    if bias is None:
        return beta.T + weight, None
    new_w, new_b = torch.split(beta, [beta.shape[0] - 1, 1], dim=0)
    return new_w.T + weight, new_b.squeeze() + bias


def refine_rounding(delta: torch.Tensor, floor_err: torch.Tensor, ceil_err: torch.Tensor, coes: torch.Tensor,
                    steps: int) -> torch.Tensor:
    """Greedy floor/ceil flips of one block of rows (``delta``, its floor and ceil errors: (rows, k)), in place."""
    failed = torch.zeros(len(delta), dtype=torch.bool, device=delta.device)
    for _ in range(steps):
        if not torch.sum(~failed) > 0:
            break
        previous = delta.clone()
        gradient = (2 * coes @ delta.T).T
        gradient[~(delta * gradient > 0)] = 0
        flips = torch.minimum(torch.sum(gradient != 0, dim=1), torch.tensor(1, device=delta.device))
        _, where = torch.topk(abs(gradient), k=int(torch.max(flips).item()), dim=1)
        step = torch.gather(delta, 1, where) - torch.gather(gradient, 1, where)
        ceils, floors = torch.gather(ceil_err, 1, where), torch.gather(floor_err, 1, where)
        step = torch.where(torch.abs(step - ceils) <= torch.abs(step - floors), ceils, floors)
        before = (delta.unsqueeze(1) @ coes @ delta.unsqueeze(2)).reshape(-1)
        old = torch.gather(delta, 1, where).clone()
        delta.scatter_(1, where, step)
        after = (delta.unsqueeze(1) @ coes @ delta.unsqueeze(2)).reshape(-1)
        failed = after > before
        undone = delta[failed].clone()
        undone.scatter_(1, where[failed], old[failed])
        delta[failed] = undone
        if torch.equal(delta, previous):  # a step is a function of delta alone: the official loop idles from here on
            break
    return delta


def progressive_quantize(wb: torch.Tensor, a: torch.Tensor, grid: Grid, lam: float, row_block: int,
                         refine_steps: int) -> torch.Tensor:
    """Wqer on ``wb`` (out, cols) with inputs ``a`` (rows, cols); ``refine_steps`` 0: plain rounding. Returns the new
    ``wb``: quantized columns on the grid (up to float error), the last column FP and compensated."""
    current = wb.clone()
    mask = torch.ones_like(current[0]).bool()
    blocks = [torch.arange(start, min(start + row_block, len(current)), device=wb.device) for start in range(0, len(current), row_block)]
    while torch.sum(mask) > 1:
        n_quant = torch.sum(mask) // 2
        n_adjust = int(torch.sum(mask) - n_quant)
        done = torch.sum(~mask)
        columns = torch.arange(0 + done, n_quant + done, device=wb.device)
        error = _error(grid(current, torch.round), current)
        if refine_steps:
            floor_err, ceil_err = _error(grid(current, torch.floor), current), _error(grid(current, torch.ceil), current)
            means = torch.mean(a[:, columns], dim=0)
            coes = means.unsqueeze(0).T @ means.unsqueeze(0) + torch.cov(a[:, columns].T)
            for rows in blocks:
                delta = refine_rounding(error.clone()[rows][:, columns], floor_err[rows][:, columns],
                                        ceil_err[rows][:, columns], coes, refine_steps)
                error[rows.unsqueeze(1), columns] = delta
        mask[columns] = False
        remaining = torch.nonzero(mask).squeeze()
        for rows in blocks:
            w1, w2 = current[rows][:, columns], current[rows][:, remaining]
            i1, i2 = a[:, columns], a[:, remaining]
            d1 = error[rows][:, columns]
            d2 = -torch.inverse(_t(i2) @ i2 + lam * torch.eye(n_adjust, device=a.device)) @ (_t(i2) @ i1) @ d1.T
            w2 += _t(d2)
            if len(w2.shape) == 1:
                w2 = w2.unsqueeze(1)
            current[rows.unsqueeze(1), columns] = w1 + d1
            current[rows.unsqueeze(1), remaining] = w2
    return current


def _t(x: torch.Tensor) -> torch.Tensor:
    """``x.T``, which is ``x`` itself for the 1-D column the last round leaves (the official code's dot product)."""
    return x if x.ndim == 1 else x.T


def _error(dequantized: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Quantization error with the last column (never quantized here) zeroed."""
    error = dequantized - current
    error[:, -1] = 0
    return error

