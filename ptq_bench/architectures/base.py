"""Architecture adapters: what a method needs to know about a model family, in one place per family.

An adapter recognises its family (:meth:`ArchitectureAdapter.matches`) and owns:

* the role of every Linear/Conv2d input (``input_roles``: post-LayerNorm, post-GELU, attention projection, ...);
* the attention swap (``convert_attention``: an attention module becomes one whose two matmuls are quantizable);
* the LayerNorm → Linear pairs a scale reparameterization folds into (``layernorm_linear_pairs``), only in blocks
  whose forward is known to be pre-norm (a Linear after any other norm gets the generic role);
* the transformer blocks a block-wise reconstruction walks through (``blocks``).

:func:`architecture_for` picks the adapter of a model and refuses, in one line, a model that no adapter recognises
or that holds attention modules its adapter cannot quantize. :func:`require` checks before calibration that the
adapter can give a method what it needs (:data:`NEEDS`), so a method never runs half-applied under its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterable

from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.registry import Registry

#: What a method may need from an architecture adapter.
NEEDS = ("layernorm_pairs", "blocks")  # layernorm_pairs: every block foldable (strict; post_norm=skip drops it)


@dataclass(frozen=True)
class NormLinearPair:
    """A LayerNorm whose output feeds ``linears`` directly (the pairs a scale reparameterization edits)."""

    norm_name: str
    norm: nn.LayerNorm
    linears: tuple[nn.Linear, ...]


class ArchitectureAdapter(ABC):
    """One model family. Subclasses list their attention classes and the block forwards they know."""

    name: ClassVar[str]
    #: Attention classes this adapter swaps (subclasses that override ``forward`` are refused).
    attention_types: ClassVar[tuple[type[nn.Module], ...]]
    #: Block classes whose forward is known to be pre-norm (``x + f(norm(x))``), so that norm → Linear pairs hold.
    pre_norm_blocks: ClassVar[tuple[type[nn.Module], ...]]

    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(m, self.attention_types) for m in model.modules())

    @abstractmethod
    def layer_roles(self, model: nn.Module) -> dict[int, str]:
        """``id(layer)`` → role of its input for the family's other special layers (attention projection,
        post-GELU, head, patch embedding); ``post_layernorm`` comes from the foldable pairs."""

    def input_roles(self, model: nn.Module) -> dict[int, str]:
        """``id(layer)`` → role of its input, for the layers whose role is not the generic ``linear``/``conv``."""
        return {**self.layer_roles(model), **{i: "post_layernorm" for i in self.foldable_inputs(model)}}

    @abstractmethod
    def convert_attention(self, module: nn.Module) -> nn.Module:
        """Turn ``module`` (one of :attr:`attention_types`) in place into its quantizable form (``matmul1``, ``matmul2``)."""

    @abstractmethod
    def block_pairs(self, name: str, block: nn.Module) -> list[NormLinearPair]:
        """The norm → Linear pairs inside one known pre-norm block."""

    @abstractmethod
    def is_block(self, module: nn.Module) -> bool:
        """Whether ``module`` is a transformer block (attention + MLP) of this family."""

    def extra_pairs(self, model: nn.Module) -> list[NormLinearPair]:
        """Pairs outside the blocks (e.g. Swin's patch merging); none by default."""
        return []

    def qkv_linears(self, model: nn.Module) -> list[nn.Linear]:
        """The packed q/k/v projections of the attention modules."""
        return [m.qkv for m in model.modules() if isinstance(m, self.attention_types)]

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, self.attention_types)]

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Transformer blocks in forward order."""
        return [(n, m) for n, m in model.named_modules() if self.is_block(m)]

    def prepare_blocks(self, model: nn.Module) -> None:
        """Make every block run its explicit forward (e.g. no fused fast path); nothing to do by default."""

    def is_pre_norm(self, block: nn.Module) -> bool:
        """Whether ``block`` is known to compute ``x + f(norm(x))``, so that its norm → Linear pairs can be folded."""
        return isinstance(block, self.pre_norm_blocks) and _keeps_forward(block, self.pre_norm_blocks)

    def is_post_norm(self, block: nn.Module) -> bool:
        """Whether ``block`` is known to be post-norm (``norm(x + f(x))``): no fold applies, and the family says so."""
        return False

    def foldable_inputs(self, model: nn.Module) -> set[int]:
        """``id`` of every Linear fed directly by a LayerNorm of a known pre-norm block (role ``post_layernorm``)."""
        return {id(linear) for pair in self.layernorm_linear_pairs(model, skip_post_norm=True) for linear in pair.linears}

    def layernorm_linear_pairs(self, model: nn.Module, skip_post_norm: bool = False) -> list[NormLinearPair]:
        """Every norm → Linear pair. A block that is not known pre-norm raises, unless ``skip_post_norm`` (then its
        norms are left alone: its Linears' inputs have the generic role and are quantized per tensor)."""
        blocks = self.blocks(model)
        if not skip_post_norm:
            self._refuse_unfoldable(blocks)
        pairs = [pair for name, block in blocks if self.is_pre_norm(block) for pair in self.block_pairs(name, block)]
        return pairs + self.extra_pairs(model)

    def _refuse_unfoldable(self, blocks: list[tuple[str, nn.Module]], skippable: bool = False) -> None:
        """One line for the first block that is not known pre-norm; ``skippable``: the method has the option
        ``post_norm`` whose value ``skip`` runs without the fold there (the line says so)."""
        for name, block in blocks:
            if not self.is_pre_norm(block):
                kind = "post-norm" if self.is_post_norm(block) else f"not a known pre-norm block of {self.name}"
                remedy = "method.post_norm=skip runs without it there" if skippable else "this method folds every block"
                raise ConfigError(
                    f"block '{name}' ({type(block).__name__}) is {kind}: LayerNorm→Linear reparameterization cannot be "
                    f"applied to it ({remedy})"
                )

    def check(self, model: nn.Module, needs: Iterable[str], method: str, skippable: bool = False) -> None:
        """Raise one line if the adapter cannot give ``method`` what it ``needs`` on ``model`` (``skippable``: the
        method can run without the LayerNorm fold in blocks that are not pre-norm, ``method.post_norm=skip``)."""
        for need in needs:
            if need == "layernorm_pairs":
                blocks = self.blocks(model)
                self._refuse_unfoldable(blocks, skippable)
                if not blocks and not self.extra_pairs(model):
                    raise ConfigError(f"method '{method}' needs LayerNorm→Linear pairs; {self.name} found none in {type(model).__name__}")
            if need == "blocks" and not self.blocks(model):
                raise ConfigError(f"method '{method}' needs transformer blocks; {self.name} found none in {type(model).__name__}")
            if need not in NEEDS:
                raise ValueError(f"unknown architecture need '{need}' (known: {', '.join(NEEDS)})")


def _keeps_forward(module: nn.Module, known: tuple[type[nn.Module], ...]) -> bool:
    """True when ``module``'s class uses the forward of one of the ``known`` classes (not an override)."""
    return any(type(module).forward is cls.forward for cls in known)


ARCHITECTURES: Registry[type[ArchitectureAdapter]] = Registry("architecture")

#: Class-name fragments of modules that compute attention; one that no adapter converts stops the run.
ATTENTION_NAME_HINTS = ("attention", "msa")


def architecture_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of ``model``; one line naming the model type when none (or more than one) recognises it."""
    matching = [cls() for cls in ARCHITECTURES.values() if cls().matches(model)]
    if not matching:
        raise ConfigError(
            f"no architecture adapter recognises {type(model).__name__}{_attention_summary(model)} "
            f"(supported: {', '.join(ARCHITECTURES.names())})"
        )
    if len(matching) > 1:
        raise ConfigError(f"{type(model).__name__} matches several architecture adapters ({', '.join(a.name for a in matching)})")
    adapter = matching[0]
    _refuse_unknown_attention(model, adapter)
    return adapter


def _refuse_unknown_attention(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    for name, module in model.named_modules():
        if isinstance(module, adapter.attention_types):
            if not _keeps_forward(module, adapter.attention_types) and not getattr(module, "quantizable", False):
                raise ConfigError(
                    f"attention module '{name}' ({type(module).__name__}) overrides the forward of "
                    f"{adapter.name}'s attention: its quantizable form would change the model"
                )
        elif _looks_like_attention(module) and not getattr(module, "quantizable", False) and not _holds(module, adapter):
            raise ConfigError(
                f"module '{name}' ({type(module).__name__}) computes attention that {adapter.name} cannot quantize"
            )


def _holds(module: nn.Module, adapter: ArchitectureAdapter) -> bool:
    """Whether ``module`` contains an attention module the adapter swaps (a wrapper, not attention itself)."""
    return any(isinstance(m, adapter.attention_types) for m in module.modules() if m is not module)


def _looks_like_attention(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    lowered = type(module).__name__.lower()
    return any(hint in lowered for hint in ATTENTION_NAME_HINTS) and any(
        isinstance(child, nn.Linear) for child in module.children()
    )


def _attention_summary(model: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in model.modules() if _looks_like_attention(m)})
    return f" (attention modules: {', '.join(kinds)})" if kinds else ""


def require(model: nn.Module, needs: Iterable[str], method: str, skippable: bool = False) -> ArchitectureAdapter:
    """The model's adapter, after checking it meets ``needs`` (one-line error otherwise; ``skippable`` as in
    :meth:`ArchitectureAdapter.check`)."""
    adapter = architecture_for(model)
    adapter.check(model, needs, method, skippable)
    return adapter

