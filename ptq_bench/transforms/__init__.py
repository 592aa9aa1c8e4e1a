"""Model transforms applied between calibration passes (scale reparameterization, ...)."""

from ptq_bench.transforms.reparam import TargetFn, mean_target, reparameterize_layernorm_

__all__ = ["TargetFn", "mean_target", "reparameterize_layernorm_"]
