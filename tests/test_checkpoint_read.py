"""A checkpoint is read once per model build: its sha256 (the run identity) is of the bytes loaded, and a Swin-B or
Cascade Mask R-CNN checkpoint (hundreds of MB) is not read a second time for the hash."""

from __future__ import annotations

import builtins
import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from conftest import REPO
from ptq_bench.models.build import build_model

SHIPPED = REPO / "checkpoints" / "mnist_vit.safetensors"


def mnist_vit_cfg(checkpoint: Path) -> Any:
    model = OmegaConf.load(REPO / "conf" / "model" / "mnist_vit.yaml").model
    model.checkpoint = str(checkpoint)
    return model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_file_is_read_once(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"mnist_vit{suffix}"
    state = safetensors.torch.load_file(str(SHIPPED))
    torch.save({"model": state}, path) if suffix == ".pth" else safetensors.torch.save_file(state, str(path))
    reads: list[str] = []

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, Path)) and Path(file) == path:
            reads.append("open")
        return real_open(file, *args, **kwargs)

    def counting_load_file(file: Any, *args: Any, **kwargs: Any) -> Any:  # safetensors opens the file in Rust
        if Path(file) == path:
            reads.append("safetensors.load_file")
        return real_load_file(file, *args, **kwargs)

    real_open, real_load_file = io.open, safetensors.torch.load_file
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib opens through io.open
    monkeypatch.setattr(safetensors.torch, "load_file", counting_load_file)
    model, info = build_model(mnist_vit_cfg(path))
    monkeypatch.undo()
    assert reads == ["open"]
    assert info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
