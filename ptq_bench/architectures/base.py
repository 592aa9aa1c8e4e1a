"""Architecture adapters: what a method needs to know about a model family, in one place per family.

An adapter recognises its family (:meth:`ArchitectureAdapter.matches`) and owns:

* the role of every Linear/Conv2d input (``input_roles``: post-LayerNorm, post-GELU, attention projection, ...);
* the attention swap (``convert_attention``: an attention module becomes one whose two matmuls are quantizable);
* the LayerNorm → Linear pairs a scale reparameterization folds into (``layernorm_linear_pairs``);
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
NEEDS = ("layernorm_pairs", "blocks")


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
    def input_roles(self, model: nn.Module) -> dict[int, str]:
        """``id(layer)`` → role of its input, for the layers whose role is not the generic ``linear``/``conv``."""

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

    def layernorm_linear_pairs(self, model: nn.Module) -> list[NormLinearPair]:
        """Every norm → Linear pair; raises if a block's forward is not known to be pre-norm."""
        pairs: list[NormLinearPair] = []
        for name, block in self.blocks(model):
            if not isinstance(block, self.pre_norm_blocks) or not _keeps_forward(block, self.pre_norm_blocks):
                raise ConfigError(
                    f"block '{name}' ({type(block).__name__}) is not a known pre-norm block of {self.name}: "
                    "LayerNorm→Linear reparameterization cannot be applied to it"
                )
            pairs.extend(self.block_pairs(name, block))
        return pairs + self.extra_pairs(model)

    def check(self, model: nn.Module, needs: Iterable[str], method: str) -> None:
        """Raise one line if the adapter cannot give ``method`` what it ``needs`` on ``model``."""
        for need in needs:
            if need == "layernorm_pairs" and not self.layernorm_linear_pairs(model):
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
        elif _looks_like_attention(module) and not getattr(module, "quantizable", False):
            raise ConfigError(
                f"module '{name}' ({type(module).__name__}) computes attention that {adapter.name} cannot quantize"
            )


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


def require(model: nn.Module, needs: Iterable[str], method: str) -> ArchitectureAdapter:
    """The model's adapter, after checking it meets ``needs`` (one-line error otherwise)."""
    adapter = architecture_for(model)
    adapter.check(model, needs, method)
    return adapter

