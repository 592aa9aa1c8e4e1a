"""torch's own transformer layers: ``nn.MultiheadAttention`` in ``nn.TransformerEncoderLayer`` (pre- or post-norm,
``batch_first`` either way) and torchvision's ``VisionTransformer`` (``EncoderBlock``: pre-norm, ``MLPBlock``).

torch runs these through fused kernels that read the weights directly (``torch._transformer_encoder_layer_fwd``,
the fast path of ``nn.MultiheadAttention``), which would bypass every swapped-in quantized layer. So the adapter
gives each encoder layer an explicit forward (the documented slow path of ``nn.TransformerEncoderLayer.forward``)
and each attention module an explicit one whose packed in-projection is a Linear (``in_proj``: q, k, v rows) and
whose two matmuls are quantizable; attention masks (boolean or additive) and key padding masks are kept.
Self-attention only; separate q/k/v projection weights, ``bias_k``/``bias_v`` and ``add_zero_attn`` are refused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock, MLPBlock

from ptq_bench.architectures.base import ARCHITECTURES, ArchitectureAdapter, NormLinearPair
from ptq_bench.architectures.quant_attention import QuantMatMuls
from ptq_bench.errors import ConfigError


class QuantMultiheadAttention(QuantMatMuls, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (self-attention) with an explicit forward, a Linear in-projection and quantizable matmuls."""

    in_proj: nn.Linear

    @classmethod
    def convert_(cls, attn: nn.Module) -> nn.Module:
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ConfigError("nn.MultiheadAttention with separate q/k/v weights, bias_k/bias_v or add_zero_attn is not supported")
        in_proj = nn.Linear(attn.embed_dim, 3 * attn.embed_dim, bias=attn.in_proj_bias is not None)
        in_proj.weight = attn.in_proj_weight
        if attn.in_proj_bias is not None:
            in_proj.bias = attn.in_proj_bias
        del attn.in_proj_weight, attn.in_proj_bias  # the parameters now live in in_proj (same tensors)
        attn.register_parameter("in_proj_weight", None)
        attn.register_parameter("in_proj_bias", None)
        converted = super().convert_(attn)
        converted.in_proj = in_proj
        return converted

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not (query is key and key is value):
            raise ConfigError("quantized nn.MultiheadAttention supports self-attention only (query, key and value the same tensor)")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, _ = x.shape
        head_dim = self.embed_dim // self.num_heads
        q, k, v = self.in_proj(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.matmul1(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
        attn = _apply_masks(attn, attn_mask, key_padding_mask, is_causal, self.num_heads)
        attn = F.dropout(attn.softmax(dim=-1), p=self.dropout, training=self.training)
        out = self.matmul2(attn, v).transpose(1, 2).reshape(batch, tokens, self.embed_dim)
        out = self.out_proj(out)
        out = out if self.batch_first else out.transpose(0, 1)
        weights = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
        return out, weights


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = not allowed) as an additive one; an additive mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def _apply_masks(
    attn: torch.Tensor, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], is_causal: bool, heads: int
) -> torch.Tensor:
    batch, _, tokens, keys = attn.shape
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tokens, keys, dtype=torch.bool, device=attn.device).triu(1)
    if attn_mask is not None:
        mask = _additive(attn_mask, attn)
        attn = attn + (mask.view(batch, heads, tokens, keys) if mask.dim() == 3 else mask)
    if key_padding_mask is not None:
        attn = attn + _additive(key_padding_mask, attn).view(batch, 1, 1, keys)
    return attn


class ExplicitEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without its fused fast path (so its submodules, quantized ones included, run)."""

    quantizable = True

    def forward(
        self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None, src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


def _is_gelu(activation: object) -> bool:
    return isinstance(activation, nn.GELU) or activation is F.gelu


@ARCHITECTURES.register("torch_transformer")
class TorchTransformer(ArchitectureAdapter):
    name = "torch_transformer"
    attention_types = (nn.MultiheadAttention,)
    pre_norm_blocks = (EncoderBlock,)

    def prepare_blocks(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder):
                module.use_nested_tensor = False  # its nested-tensor fast path reads the packed weights too
            if type(module) is nn.TransformerEncoderLayer:
                module.__class__ = ExplicitEncoderLayer
            elif isinstance(module, nn.TransformerEncoderLayer) and not isinstance(module, ExplicitEncoderLayer):
                raise ConfigError(f"{type(module).__name__} overrides nn.TransformerEncoderLayer: its forward is not known")

    def is_block(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.TransformerEncoderLayer, EncoderBlock))

    def is_pre_norm(self, block: nn.Module) -> bool:
        if isinstance(block, nn.TransformerEncoderLayer):
            return bool(block.norm_first) and type(block) in (nn.TransformerEncoderLayer, ExplicitEncoderLayer)
        return super().is_pre_norm(block)

    def is_post_norm(self, block: nn.Module) -> bool:
        return isinstance(block, nn.TransformerEncoderLayer) and not block.norm_first

    def block_pairs(self, name: str, block: nn.Module) -> list[NormLinearPair]:
        prefix = f"{name}." if name else ""
        attn, fc1, norms = _parts(block)
        return [
            NormLinearPair(prefix + norms[0], getattr(block, norms[0]), (attn.in_proj,)),
            NormLinearPair(prefix + norms[1], getattr(block, norms[1]), (fc1,)),
        ]

    def qkv_linears(self, model: nn.Module) -> list[nn.Linear]:
        return [m.in_proj for m in model.modules() if isinstance(m, QuantMultiheadAttention)]

    def convert_attention(self, module: nn.Module) -> nn.Module:
        return QuantMultiheadAttention.convert_(module)

    def layer_roles(self, model: nn.Module) -> dict[int, str]:
        roles: dict[int, str] = {}
        for module in model.modules():
            if isinstance(module, nn.MultiheadAttention):
                roles[id(module.out_proj)] = "attn_proj"
            if isinstance(module, nn.TransformerEncoderLayer) and _is_gelu(module.activation):
                roles[id(module.linear2)] = "post_gelu"
            if isinstance(module, MLPBlock):
                roles[id(module[3])] = "post_gelu"
        head = getattr(getattr(model, "heads", None), "head", None)
        if isinstance(head, nn.Linear):
            roles[id(head)] = "head"
        if isinstance(getattr(model, "conv_proj", None), nn.Conv2d):
            roles[id(model.conv_proj)] = "patch_embed"
        return roles


def _parts(block: nn.Module) -> tuple[nn.Module, nn.Linear, tuple[str, str]]:
    """(attention, first MLP Linear, names of the two norms) of an encoder layer or a torchvision EncoderBlock."""
    if isinstance(block, nn.TransformerEncoderLayer):
        return block.self_attn, block.linear1, ("norm1", "norm2")
    return block.self_attention, block.mlp[0], ("ln_1", "ln_2")
