"""Which process speaks for a distributed run: under ``torchrun`` (task=coco, ``task.launcher``) every rank evaluates
its share of the images, but one run has one record and one wandb run, so only rank 0 writes and logs them."""

from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    """This process's rank in the default process group; 0 when there is none (a single-process run)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 and in a single-process run: the process that writes the record and logs it."""
    return rank() == 0
