"""timm Swin: ``SwinTransformerBlock`` (pre-norm, shifted windows) with ``WindowAttention`` and ``Mlp``, and
``PatchMerging`` whose LayerNorm feeds its ``reduction`` Linear."""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Mlp
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
from torch import nn

from ptq_bench.architectures.base import ARCHITECTURES, ArchitectureAdapter, NormLinearPair
from ptq_bench.architectures.quant_attention import QuantMatMuls
from ptq_bench.architectures.timm_vit import attention_mlp_pairs, attention_mlp_roles


class QuantWindowAttention(QuantMatMuls, WindowAttention):
    """timm Swin ``WindowAttention`` with explicit, quantizable matmuls; relative position bias and shift mask kept."""

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


@ARCHITECTURES.register("timm_swin")
class TimmSwin(ArchitectureAdapter):
    name = "timm_swin"
    attention_types = (WindowAttention,)
    pre_norm_blocks = (SwinTransformerBlock,)

    def layer_roles(self, model: nn.Module) -> dict[int, str]:
        return attention_mlp_roles(model, self.attention_types)

    def convert_attention(self, module: nn.Module) -> nn.Module:
        return QuantWindowAttention.convert_(module)

    def is_block(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "attn", None), WindowAttention) and isinstance(getattr(module, "mlp", None), Mlp)

    def block_pairs(self, name: str, block: nn.Module) -> list[NormLinearPair]:
        return attention_mlp_pairs(name, block)

    def extra_pairs(self, model: nn.Module) -> list[NormLinearPair]:
        return [
            NormLinearPair(f"{name}.norm" if name else "norm", module.norm, (module.reduction,))
            for name, module in model.named_modules()
            if isinstance(module, PatchMerging) and isinstance(module.norm, nn.LayerNorm)
        ]
