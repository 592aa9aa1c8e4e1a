"""mmdet 3's Swin backbone (``mmdet/models/backbones/swin.py``): ``SwinBlock`` (pre-norm, called as
``block(x, hw_shape)``) with ``ShiftWindowMSA`` around ``WindowMSA`` and mmcv's ``FFN``, and mmdet's ``PatchMerging``
(``mmdet/models/layers/transformer/utils.py``) whose LayerNorm feeds its ``reduction`` Linear.

What is quantized follows RepQ-ViT's detection code (zkkli/RepQ-ViT ``detection/tools/quant/quant_model.py``): it
swaps every ``nn.Conv2d`` and ``nn.Linear`` of the *whole detector* (backbone, FPN, RPN, RoI box and mask heads) and
the two attention matmuls of the backbone; the patch-embedding conv input is quantized at 8 bits and the inputs of
qkv, fc1 and the patch-merging reduction per channel (post-LayerNorm). ``prepare_`` does the same here: the adapter
gives the backbone's roles; the neck's and heads' layers take the generic ``conv``/``linear`` roles. Not quantized
(no ``nn.Conv2d``/``nn.Linear``): the mask head's ``ConvTranspose2d`` upsampling, RoIAlign, NMS, normalisations.

mmdet is imported lazily (only when a model from ``mmdet.models.backbones.swin`` exists), so that this module costs
nothing in runs without the detection extra.

Padding and the LayerNorm fold: ``ShiftWindowMSA`` pads the *LayerNorm output* with zeros up to a multiple of the
window size, and the padded tokens take part in attention. :class:`ZeroPaddedShiftWindowMSA` keeps that, as mmdet
and every official detection fork do (RepQ-ViT's and APHQ-ViT's forks of Swin-Transformer-Object-Detection): the
padded zeros reach the qkv input quantizer, and a padded token's q, k, v is ``qkv(0)``. A LayerNorm→Linear scale
reparameterization keeps ``qkv(norm(x))`` for real tokens but moves ``qkv(0)`` (the folded bias), so in the official
code the fold changes the FP detector in every window that holds padding; so it does here. The run-time fold check
(:func:`ptq_bench.transforms.invariants.keeps_fp_function`) holds padded positions at their projection before the
transform (:meth:`~ZeroPaddedShiftWindowMSA.padding_held`), so that it still proves the fold on every real token,
and records the change of the unheld detector beside it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.architectures.base import ARCHITECTURES, ArchitectureAdapter, NormLinearPair
from ptq_bench.architectures.quant_attention import QuantMatMuls
from ptq_bench.errors import ConfigError

SWIN_MODULE = "mmdet.models.backbones.swin"


def _swin():
    """mmdet's swin module (imported by whoever built an mmdet model)."""
    import mmdet.models.backbones.swin as swin

    return swin


class _Lazy:
    """Quantizable subclasses of mmdet's classes, created on first use (mmdet is an optional dependency)."""

    window_msa: Optional[type] = None
    shift_window_msa: Optional[type] = None

    @classmethod
    def classes(cls) -> tuple[type, type]:
        if cls.window_msa is None:
            cls.window_msa, cls.shift_window_msa = _make_classes()
        return cls.window_msa, cls.shift_window_msa  # type: ignore[return-value]


def _make_classes() -> tuple[type, type]:
    swin = _swin()

    class QuantWindowMSA(QuantMatMuls, swin.WindowMSA):
        """mmdet ``WindowMSA`` with explicit, quantizable matmuls; relative position bias and shift mask kept
        (operation order of ``WindowMSA.forward``: q scaled, Q·Kᵀ, + bias, + mask, softmax, ·V, proj)."""

        def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            return self.attend(self.qkv(x), mask)

        def relative_bias(self) -> torch.Tensor:
            n = self.window_size[0] * self.window_size[1]
            table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            return table.view(n, n, -1).permute(2, 0, 1).contiguous()

        def attend(self, qkv: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            """Attention of windows given their qkv projection ``(num_windows*B, N, 3C)``."""
            B, N, C3 = qkv.shape
            C = C3 // 3
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
            attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
            attn = attn + self.relative_bias().unsqueeze(0)
            if mask is not None:
                windows = mask.shape[0]
                attn = attn.view(B // windows, windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            attn = self.attn_drop(self.softmax(attn))
            x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, C)
            return self.proj_drop(self.proj(x))

    class ZeroPaddedShiftWindowMSA(swin.ShiftWindowMSA):
        """mmdet ``ShiftWindowMSA``, operation for operation (zeros padded after the LayerNorm, rolled, cut into
        windows, projected by qkv), with the qkv call and the attention split so that a fold check can hold the
        padded positions' projection (module docstring)."""

        held_qkv: Optional[torch.Tensor] = None

        @classmethod
        def convert_(cls, module: nn.Module) -> nn.Module:
            module.__class__ = cls
            return module

        def zero_token_projection(self) -> torch.Tensor:
            """qkv of a zero token now (the bias of a plain Linear; call with the quantizers off for the FP one)."""
            qkv = self.w_msa.qkv
            with torch.no_grad():
                return qkv(torch.zeros(1, 1, qkv.in_features, dtype=qkv.weight.dtype, device=qkv.weight.device))[0, 0]

        @contextmanager
        def padding_held(self, projection: torch.Tensor) -> Iterator[None]:
            """Padded positions take ``projection`` as their qkv output inside the context."""
            self.held_qkv = projection
            try:
                yield
            finally:
                self.held_qkv = None

        def shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
            """The additive SW-MSA mask (0 within a region, -100 across regions), one per window."""
            ws, shift = self.window_size, self.shift_size
            regions = torch.zeros((1, height, width, 1), device=device)
            bounds = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
            for label, (h, w) in enumerate((h, w) for h in bounds for w in bounds):
                regions[:, h, w, :] = label
            ids = self.window_partition(regions).view(-1, ws * ws)
            diff = ids.unsqueeze(1) - ids.unsqueeze(2)
            return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

        def windows(self, x: torch.Tensor, pad_r: int, pad_b: int) -> torch.Tensor:
            """``(B, H, W, D)`` padded with zeros, rolled by -shift, partitioned: ``(windows·B, ws², D)``."""
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            if self.shift_size > 0:
                x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            return self.window_partition(x).view(-1, self.window_size**2, x.shape[-1])

        def forward(self, query: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
            B, L, C = query.shape
            H, W = hw_shape
            if L != H * W:
                raise ValueError("input feature has wrong size")
            ws = self.window_size
            pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
            Hp, Wp = H + pad_b, W + pad_r
            qkv = self.w_msa.qkv(self.windows(query.view(B, H, W, C), pad_r, pad_b))
            if self.held_qkv is not None and (pad_r or pad_b):
                real = self.windows(query.new_ones(1, H, W, 1), pad_r, pad_b).repeat(B, 1, 1)
                qkv = torch.where(real > 0, qkv, self.held_qkv.to(qkv.dtype))
            mask = self.shift_mask(Hp, Wp, query.device) if self.shift_size > 0 else None
            out = self.w_msa.attend(qkv, mask).view(-1, ws, ws, C)
            x = self.window_reverse(out, Hp, Wp)
            if self.shift_size > 0:
                x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
            x = x[:, :H, :W, :].contiguous().view(B, H * W, C)
            return self.drop(x)

    return QuantWindowMSA, ZeroPaddedShiftWindowMSA


def _ffn_linears(ffn: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """fc1 and fc2 of mmcv's 2-layer ``FFN``: ``layers = [Sequential(Linear, act, Dropout), Linear, Dropout]``."""
    return ffn.layers[0][0], ffn.layers[1]


@ARCHITECTURES.register("mmdet_swin")
class MMDetSwin(ArchitectureAdapter):
    """mmdet's ``SwinTransformer`` inside any mmdet detector (Mask R-CNN, Cascade Mask R-CNN, ...)."""

    name = "mmdet_swin"

    @property
    def attention_types(self) -> tuple[type[nn.Module], ...]:  # type: ignore[override]
        return (_swin().WindowMSA,)

    @property
    def pre_norm_blocks(self) -> tuple[type[nn.Module], ...]:  # type: ignore[override]
        return (_swin().SwinBlock,)

    def matches(self, model: nn.Module) -> bool:
        if SWIN_MODULE not in sys.modules:  # no mmdet Swin can exist before its module was imported
            return False
        return super().matches(model)

    def prepare_blocks(self, model: nn.Module) -> None:
        """Make every ``ShiftWindowMSA`` a :class:`ZeroPaddedShiftWindowMSA` (mmdet's forward, padding holdable by
        the fold check); a subclass with its own forward is refused rather than replaced."""
        swin = _swin()
        _, zero_padded = _Lazy.classes()
        for name, module in model.named_modules():
            if isinstance(module, swin.ShiftWindowMSA) and not isinstance(module, zero_padded):
                if type(module).forward is not swin.ShiftWindowMSA.forward:
                    raise ConfigError(f"'{name}' ({type(module).__name__}) overrides ShiftWindowMSA.forward: {self.name} cannot quantize it")
                zero_padded.convert_(module)

    def layer_roles(self, model: nn.Module) -> dict[int, str]:
        swin = _swin()
        roles: dict[int, str] = {}
        for module in model.modules():
            if isinstance(module, swin.SwinTransformer):
                roles[id(module.patch_embed.projection)] = "patch_embed"
            elif isinstance(module, swin.WindowMSA):
                roles[id(module.proj)] = "attn_proj"
            elif isinstance(module, swin.SwinBlock):
                roles[id(_ffn_linears(module.ffn)[1])] = "post_gelu"
        return roles

    def convert_attention(self, module: nn.Module) -> nn.Module:
        quant_window_msa, _ = _Lazy.classes()
        return quant_window_msa.convert_(module)

    def is_block(self, module: nn.Module) -> bool:
        swin = _swin()
        return isinstance(module, swin.SwinBlock) and isinstance(module.attn, swin.ShiftWindowMSA)

    def block_pairs(self, name: str, block: nn.Module) -> list[NormLinearPair]:
        """norm1 → attn.w_msa.qkv (whose padded zeros the fold moves, as in the official code) and norm2 → ffn fc1."""
        prefix = f"{name}." if name else ""
        return [
            NormLinearPair(prefix + "norm1", block.norm1, (block.attn.w_msa.qkv,)),
            NormLinearPair(prefix + "norm2", block.norm2, (_ffn_linears(block.ffn)[0],)),
        ]

    def extra_pairs(self, model: nn.Module) -> list[NormLinearPair]:
        """Patch merging: its LayerNorm feeds its reduction directly (after nn.Unfold, whose padding precedes the norm)."""
        from mmdet.models.layers.transformer.utils import PatchMerging

        return [
            NormLinearPair(f"{name}.norm", module.norm, (module.reduction,))
            for name, module in model.named_modules()
            if isinstance(module, PatchMerging) and isinstance(module.norm, nn.LayerNorm)
        ]


__all__ = ["MMDetSwin"]
