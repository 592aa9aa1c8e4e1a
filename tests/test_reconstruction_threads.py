"""Block reconstruction of small blocks runs on one CPU thread and restores the thread count afterwards."""

from __future__ import annotations

import torch
from torch import nn

from ptq_bench.transforms.block_capture import BlockInputs
from ptq_bench.transforms.reconstruction import SMALL_BATCH_ELEMENTS, ReconStep, cpu_threads_for, reconstruct_block


def test_small_batches_run_on_one_thread_and_restore_the_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = torch.zeros(64, 50, 64)  # 32 × 50 × 64 per batch: an MNIST-ViT block
        large = torch.zeros(64, 197, 192)  # 32 × 197 × 192: a deit_tiny block
        assert 32 * small[0].numel() < SMALL_BATCH_ELEMENTS <= 32 * large[0].numel()
        with cpu_threads_for(small, 32):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with cpu_threads_for(large, 32):
            assert torch.get_num_threads() == 2
        with cpu_threads_for(BlockInputs([torch.zeros(1, 50, 64)] * 4, [(7, 7)] * 4), 32):
            assert torch.get_num_threads() == 1
        seen = []
        block = nn.Linear(64, 64)
        step = ReconStep(torch.optim.SGD(block.parameters(), lr=0.0), torch.arange(8), after=lambda: seen.append(torch.get_num_threads()))
        reconstruct_block(block, torch.randn(8, 50, 64), torch.randn(8, 50, 64), [step], 2, 4, torch.Generator().manual_seed(0))
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
