"""timm ViT / DeiT: ``Block`` (pre-norm) with ``Attention`` and ``Mlp``, a patch-embedding conv and a Linear head."""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Attention, Mlp
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block
from torch import nn

from ptq_bench.architectures.base import ARCHITECTURES, ArchitectureAdapter, NormLinearPair
from ptq_bench.architectures.quant_attention import QuantMatMuls


class QuantAttention(QuantMatMuls, Attention):
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


def common_roles(model: nn.Module) -> dict[int, str]:
    """The classifier head and the patch-embedding conv of a timm model."""
    roles: dict[int, str] = {}
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier) and isinstance(get_classifier(), nn.Linear):
        roles[id(get_classifier())] = "head"
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and isinstance(getattr(patch_embed, "proj", None), nn.Conv2d):
        roles[id(patch_embed.proj)] = "patch_embed"
    return roles


def attention_mlp_roles(model: nn.Module, attention_types: tuple[type[nn.Module], ...]) -> dict[int, str]:
    """proj after attention, fc2 post-GELU, head and patch embedding."""
    roles = common_roles(model)
    for module in model.modules():
        if isinstance(module, attention_types):
            roles[id(module.proj)] = "attn_proj"
        elif isinstance(module, Mlp):
            roles[id(module.fc2)] = "post_gelu"
    return roles


def attention_mlp_pairs(name: str, block: nn.Module) -> list[NormLinearPair]:
    """norm1 → attn.qkv and norm2 → mlp.fc1 of a pre-norm block."""
    prefix = f"{name}." if name else ""
    return [
        NormLinearPair(prefix + "norm1", block.norm1, (block.attn.qkv,)),
        NormLinearPair(prefix + "norm2", block.norm2, (block.mlp.fc1,)),
    ]


@ARCHITECTURES.register("timm_vit")
class TimmViT(ArchitectureAdapter):
    name = "timm_vit"
    attention_types = (Attention,)
    pre_norm_blocks = (Block,)

    def layer_roles(self, model: nn.Module) -> dict[int, str]:
        return attention_mlp_roles(model, self.attention_types)

    def convert_attention(self, module: nn.Module) -> nn.Module:
        return QuantAttention.convert_(module)

    def is_block(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "attn", None), Attention) and isinstance(getattr(module, "mlp", None), Mlp)

    def block_pairs(self, name: str, block: nn.Module) -> list[NormLinearPair]:
        return attention_mlp_pairs(name, block)
