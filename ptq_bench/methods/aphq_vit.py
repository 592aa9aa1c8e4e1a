"""APHQ-ViT (Wu et al., CVPR 2025, arXiv 2504.02508), following GoatWu/APHQ-ViT @ 84c9fde.

Calibration (:mod:`ptq_bench.methods.aphq_vit_calibration`): AdaLog's layer-by-layer pipeline with uniform grids
and the fork's searches.
"""

from __future__ import annotations

from ptq_bench.methods.aphq_vit_calibration import AphqCalibration, CalibrationOptions
from ptq_bench.methods.base import METHODS


@METHODS.register("aphq_vit")
class AphqVit(AphqCalibration):
    """APHQ-ViT: configs/{3,4}bit/best.py."""

    name = "aphq_vit"
    Options = CalibrationOptions
