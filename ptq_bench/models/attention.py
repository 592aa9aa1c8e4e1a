"""Quantizable forward passes for timm's ViT/DeiT ``Attention`` and Swin ``WindowAttention``.

Each class is a subclass of the timm module it replaces (converted in place, parameters untouched) that computes
attention explicitly with two :class:`QuantMatMul` modules, so that Q, K, the post-Softmax map and V each pass
through their own quantizer. The order of operations follows RepQ-ViT's replacement forwards
(classification/quant/quant_model.py): ``matmul1(q, kᵀ) * scale``, softmax, ``matmul2(attn, v)``.
Swin keeps its relative position bias and its shifted-window mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.swin_transformer import WindowAttention

from ptq_bench.quant.layers import QuantMatMul


class _QuantMatMuls:
    """Adds the two quantizable matmuls to a timm attention module converted in place."""

    matmul1: QuantMatMul
    matmul2: QuantMatMul

    @classmethod
    def convert_(cls, attn: nn.Module):
        attn.__class__ = cls
        attn.matmul1 = QuantMatMul()
        attn.matmul2 = QuantMatMul()
        return attn


class QuantAttention(_QuantMatMuls, Attention):
    """timm ``Attention`` with explicit, quantizable matmuls."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale  # not in place: hooks may hold the output
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(_QuantMatMuls, WindowAttention):
    """timm Swin ``WindowAttention`` with explicit, quantizable matmuls."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
