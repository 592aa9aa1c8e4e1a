"""Per-block checkpoints, so that an interrupted block-wise reconstruction resumes where it stopped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.quant.base import Quantizer


class BlockStateStore:
    """Per-block checkpoints for resuming a block-wise reconstruction.

    After a block is finished, ``save`` writes its ``state_dict`` and caller metadata atomically to
    ``<dir>/<block name>.pt`` together with a fingerprint of the run (config, bits, calibration data);
    ``load`` restores a finished block and refuses a file written by a different run.
    """

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint

    def path(self, name: str) -> Path:
        return self.directory / f"{name or 'model'}.pt"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, block: nn.Module, meta: dict[str, Any]) -> None:
        tmp = self.path(name).with_suffix(".tmp")
        state = {k: v.detach().cpu() for k, v in block.state_dict().items()}
        torch.save({"fingerprint": self.fingerprint, "meta": meta, "state": state}, tmp)
        os.replace(tmp, self.path(name))

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata of a saved block (checked against this run's fingerprint)."""
        return self._read(name)["meta"]

    def load(self, name: str, block: nn.Module) -> None:
        """Load a saved block's state into ``block`` (which must already have the saved structure)."""
        block.load_state_dict(self._read(name)["state"])
        for module in block.modules():
            if isinstance(module, Quantizer):
                module.params_changed()

    def _read(self, name: str) -> dict[str, Any]:
        saved = torch.load(self.path(name), map_location="cpu", weights_only=True)
        if saved["fingerprint"] != self.fingerprint:
            raise ConfigError(
                f"{self.path(name)} was written by a different run (config, bits or calibration data differ); "
                "use another state_dir or delete it"
            )
        return saved
