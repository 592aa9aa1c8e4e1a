"""RepQ-ViT calibration time: ours vs the official code (zkkli/RepQ-ViT), same models, inputs and thread count.

Ours: ``RepQViT.quantize`` (module swap, calibration forward, reparameterization, weight refit) on a random-init
timm model with 32 seeded N(0, 1) images (the oracles' convention). Official: the timing oracle
(``$PEER_ROOT/oracles/repqvit_oracle_timing.py``, the official ``test_quant.main()`` with I/O patches) run in a
subprocess in the same invocation, window "calibration_incl_reparam" (quant_model + initial quantization +
reparameterization + re-calibration). Without a peer setup, ``--official recorded`` reads the timings an
earlier oracle run stored in its json. Process CPU seconds are the figure to trust on a shared machine.

    python benchmarks/calibration_speed.py --models deit_tiny deit_small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import timm
import torch

from ptq_bench.calibration import image_calibration
from ptq_bench.methods import BitWidth, build_method

TIMM_NAMES = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}
TARGET_RATIO = 0.25


def time_ours(model_name: str, calib_size: int, seed: int, bits: BitWidth) -> tuple[float, float]:
    """(wall, process CPU) seconds of our RepQ-ViT calibration."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False).eval()
    calib = torch.randn((calib_size, 3, 224, 224), generator=torch.Generator().manual_seed(seed + 1000))
    wall, cpu = time.perf_counter(), time.process_time()
    build_method("repq_vit", bits).quantize(model, image_calibration(calib))
    return time.perf_counter() - wall, time.process_time() - cpu


def time_official(
    peer_root: Path, model_name: str, calib_size: int, seed: int, bits: BitWidth, threads: int
) -> tuple[float, Optional[float]]:
    """(wall, process CPU) seconds of the official calibration, run now through the timing oracle."""
    script = peer_root / "oracles" / "repqvit_oracle_timing.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "oracle.npz"
        cmd = [str(peer_root / "venv" / "bin" / "python"), str(script), "--model", model_name, "--seed", str(seed),
               "--w-bits", str(bits.w), "--a-bits", str(bits.a), "--calib-size", str(calib_size),
               "--eval-size", "1", "--threads", str(threads), "--out", str(out)]
        env = dict(os.environ, PEER_ROOT=str(peer_root))
        subprocess.run(cmd, cwd=script.parent, env=env, check=True, capture_output=True, text=True)
        timings = json.loads(out.with_suffix(".json").read_text())["timings_s"]
    return timings["calibration_incl_reparam"], timings.get("calibration_incl_reparam_cpu")


def recorded_official(peer_root: Path, short: str) -> tuple[float, Optional[float]]:
    """Timings stored by an earlier timing-oracle run (oracle_out/timing/repq_<model>_w4a4_t1.json)."""
    path = peer_root / "oracle_out" / "timing" / f"repq_{short}_w4a4_t1.json"
    timings = json.loads(path.read_text())["timings_s"]
    return timings["calibration_incl_reparam"], timings.get("calibration_incl_reparam_cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"], choices=sorted(TIMM_NAMES))
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peer-root", type=Path, default=Path(os.environ.get("PEER_ROOT", "../peers")))
    parser.add_argument("--official", choices=["run", "recorded", "skip"], default="run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bits = BitWidth(4, 4)
    for short in args.models:
        name = TIMM_NAMES[short]
        ours_wall, ours_cpu = time_ours(name, args.calib_size, args.seed, bits)
        line = f"{short}: ours {ours_wall:.2f} s wall / {ours_cpu:.2f} s CPU"
        if args.official != "skip":
            if args.official == "run":
                off_wall, off_cpu = time_official(args.peer_root, name, args.calib_size, args.seed, bits, args.threads)
            else:
                off_wall, off_cpu = recorded_official(args.peer_root, short)
            line += f" | official ({args.official}) {off_wall:.2f} s wall"
            if off_cpu is not None:
                ratio = ours_cpu / off_cpu
                line += f" / {off_cpu:.2f} s CPU | ratio (CPU) {ratio:.3f} (target <= {TARGET_RATIO})"
            line += f" | ratio (wall) {ours_wall / off_wall:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
