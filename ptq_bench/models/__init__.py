"""Building models from config and swapping in quantizable modules (through the architecture adapters)."""

from ptq_bench.models.prepare import (
    ROLES,
    NormLinearPair,
    QuantSite,
    calibrating,
    find_blocks,
    layernorm_linear_pairs,
    named_quantizers,
    only_quantizers,
    prepare_,
    quantizers_off,
    set_quantizers_enabled,
)

__all__ = [
    "ROLES",
    "NormLinearPair",
    "QuantSite",
    "calibrating",
    "find_blocks",
    "layernorm_linear_pairs",
    "named_quantizers",
    "only_quantizers",
    "prepare_",
    "quantizers_off",
    "set_quantizers_enabled",
]
