"""Which process speaks for a distributed run: under ``torchrun`` (task=coco, ``task.launcher``) every rank evaluates
its share of the images, but one run has one record and one wandb run, so only rank 0 writes and logs them."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank() -> int:
    """This process's rank in the default process group; without one, the launcher's ``RANK`` (torchrun sets it
    also for a task that evaluates on every rank without a group); 0 in a single-process run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 and in a single-process run: the process that writes the record and logs it."""
    return rank() == 0
