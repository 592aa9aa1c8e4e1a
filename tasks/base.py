"""The task adapter interface: what differs between tasks, and nothing else.

A task builds the FP model, draws the calibration data (:class:`ptq_bench.calibration.CalibrationData`, whose
``forward`` is the task's :meth:`Task.forward`), evaluates a model into a metrics dict and names its primary metric.
Identity, resume, seeds, device, timing, memory, the record and logging belong to the harness
(:mod:`ptq_bench.harness`), the same for every task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.models.build import ModelInfo


class Task(ABC):
    """One task (classification, COCO detection, ...), built from the whole run config."""

    name: ClassVar[str]
    #: The metric a table shows by default (a key of :meth:`evaluate`'s result).
    primary_metric: ClassVar[str]
    #: Whether :meth:`evaluate` calls the model it is given as ``model(batch)``, so ``eval_compile`` can compile it.
    compilable: ClassVar[bool] = False

    def __init__(self, cfg: DictConfig, progress: bool) -> None:
        self.cfg = cfg
        self.progress = progress

    @abstractmethod
    def validate(self) -> None:
        """Check the task's and the data's config values by type and range (one line each), before any work."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Task options and data settings that determine a result (enters the run key)."""

    @abstractmethod
    def build_model(self) -> tuple[nn.Module, ModelInfo]:
        """The FP model in eval mode, and the identity of its weights."""

    def describe_model(self, model: nn.Module, info: ModelInfo) -> dict[str, Any]:
        """The record's ``model`` section."""
        return {**info.__dict__, "display": self.cfg.model.get("display", info.name)}

    def check_data(self, calib_size: int) -> None:
        """Open the data the run will read (one-line errors for a missing root, an empty split, fewer train samples
        than ``calib_size``) before any calibration or evaluation."""

    def uncovered_hint(self) -> str | None:
        """Why a layer of this task's model may not run on the calibration data (shown when one did not), if any."""
        return None

    @abstractmethod
    def calibration(self, size: int, seed: int, device: torch.device) -> CalibrationData:
        """``size`` samples of the train split drawn with ``seed``, on ``device``; ``identity`` says which."""

    @abstractmethod
    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run ``model`` on one batch of this task: the only place that knows how to call the model."""

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device, label: str, fp_model: nn.Module | None = None) -> dict[str, Any]:
        """The metrics of ``model`` on the evaluation split (with ``fp_model``: fidelity metrics too)."""
