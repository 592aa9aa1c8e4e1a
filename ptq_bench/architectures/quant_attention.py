"""The quantizable-attention mixin: two :class:`QuantMatMul` modules added to an attention module converted in place.

Each adapter subclasses its family's attention class with this mixin and writes the forward explicitly, so that
Q, K, the post-Softmax map and V each pass through their own quantizer. The order of operations follows RepQ-ViT's
replacement forwards (classification/quant/quant_model.py): ``matmul1(q, kᵀ) * scale``, softmax, ``matmul2(attn, v)``.
"""

from __future__ import annotations

from torch import nn

from ptq_bench.quant.layers import QuantMatMul


class QuantMatMuls:
    """Adds ``matmul1`` (Q·Kᵀ) and ``matmul2`` (softmax·V) to an attention module converted in place."""

    matmul1: QuantMatMul
    matmul2: QuantMatMul
    #: Marks the converted form, whose forward is ours (architecture checks accept it).
    quantizable = True

    @classmethod
    def convert_(cls, attn: nn.Module) -> nn.Module:
        attn.__class__ = cls
        attn.matmul1 = QuantMatMul()
        attn.matmul2 = QuantMatMul()
        return attn
