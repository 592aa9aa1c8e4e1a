"""torch <= 2.13's clamp gradient, patched into torch for an official code's run (the oracles' ``--clamp-inclusive``).

torch's ``clamp`` passed the gradient on its bounds, ``where(min <= x <= max, grad, 0)``, until 2.13; torch 2.14 gives
0 there. The official codes were run under torch 1.x (their READMEs), so a run under torch 2.14 that must reproduce
their training patches ``torch.clamp`` and ``Tensor.clamp`` with number (or None) bounds back to that gradient.
"""
from __future__ import annotations


def inclusive_clamp():
    """torch.clamp / Tensor.clamp with number (or None) bounds differentiated as torch <= 2.13 did."""
    import torch
    orig_fn, orig_method = torch.clamp, torch.Tensor.clamp

    class InclusiveClamp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lo, hi):
            ctx.save_for_backward(x)
            ctx.bounds = (lo, hi)
            return orig_fn(x, lo, hi)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            lo, hi = ctx.bounds
            inside = torch.ones_like(x, dtype=torch.bool)
            if lo is not None:
                inside = inside & (x >= lo)
            if hi is not None:
                inside = inside & (x <= hi)
            return torch.where(inside, grad, torch.zeros((), dtype=grad.dtype)), None, None

    def wants_patch(x, lo, hi, kw):
        return (not kw and isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()
                and all(b is None or isinstance(b, (int, float)) for b in (lo, hi)))

    def clamp(x, min=None, max=None, **kw):
        return InclusiveClamp.apply(x, min, max) if wants_patch(x, min, max, kw) else orig_fn(x, min, max, **kw)

    def clamp_method(self, min=None, max=None, **kw):
        return InclusiveClamp.apply(self, min, max) if wants_patch(self, min, max, kw) else orig_method(self, min, max, **kw)

    torch.clamp = clamp
    torch.Tensor.clamp = clamp_method
