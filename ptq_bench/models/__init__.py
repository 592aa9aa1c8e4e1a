"""Model adapters: building timm models from config and swapping in quantizable modules."""

from ptq_bench.models.prepare import (
    ROLES,
    NormLinearPair,
    QuantSite,
    calibrating,
    layernorm_linear_pairs,
    named_quantizers,
    prepare_,
    set_quantizers_enabled,
)

__all__ = [
    "ROLES",
    "NormLinearPair",
    "QuantSite",
    "calibrating",
    "layernorm_linear_pairs",
    "named_quantizers",
    "prepare_",
    "set_quantizers_enabled",
]
