"""Architecture adapters (one per model family); importing this package registers each in :data:`ARCHITECTURES`."""

from ptq_bench.architectures.base import ARCHITECTURES, NEEDS, ArchitectureAdapter, NormLinearPair, architecture_for, require
from ptq_bench.architectures import mmdet_swin, timm_swin, timm_vit, torch_transformer  # noqa: F401,E402  (registration)

__all__ = ["ARCHITECTURES", "NEEDS", "ArchitectureAdapter", "NormLinearPair", "architecture_for", "require"]
