"""Calibration time of RepQ-ViT or ERQ: ours vs the official code (zkkli/RepQ-ViT, zysxmu/ERQ), same models, inputs
and thread count.

Ours: ``RepQViT.quantize`` (module swap, calibration forward, reparameterization, weight refit) on a random-init
timm model with ``--calib-size`` seeded N(0, 1) images (the oracles' convention). Official: the RepQ-ViT oracle of
``../shared/oracles/repqvit_oracle.py`` (the official ``test_quant.main()`` with I/O patches only), run in a
subprocess right after ours, with the same seed, bits, calibration size and threads; its JSON sidecar gives the
window "calibration_incl_reparam" (quant_model + initial calibration + reparameterization + re-calibration) in wall
and process CPU seconds. Process CPU seconds are the figure to trust on a shared machine. ``--method erq`` does the
same with ``../shared/oracles/erq_oracle.py`` (window "calibration": activation calibration, reparameterization, FP
capture, Aqer, weight calibration, Wqer) at our YAML's coe.

The official code lives outside the repository, in a peer root set up once as ../shared/oracles/README.md "Setup"
says (``<peer root>/RepQ-ViT`` and ``<peer root>/timm-0.4.12``; the interpreter is ``<peer root>/venv/bin/python``
when it exists, else this one). The peer root is ``--peer-root``, else ``$PEER_ROOT``, else ``../peers`` beside
the clone. ``--official run`` keeps each oracle sidecar in ``--timings-dir`` (default
``outputs/benchmarks/oracle_timing``, ignored by git); ``--official recorded`` reuses those files instead of
running the official code again, and ``--official skip`` times ours alone. The default, ``auto``, runs the official
code when the peer root has it and otherwise times ours alone, saying so (a fresh clone with ../shared/ only).

    python benchmarks/calibration_speed.py --models deit_tiny deit_small [--official auto|run|recorded|skip]
    python benchmarks/calibration_speed.py --official skip --method ptq4vit --depth 1 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in

import timm  # noqa: E402
import torch  # noqa: E402

from ptq_bench.calibration import image_calibration  # noqa: E402
from ptq_bench.methods import BitWidth, build_method  # noqa: E402
from ptq_bench.methods.options import method_defaults  # noqa: E402
from _clock import clock  # noqa: E402  (benchmarks/_clock.py)
from _models import TIMM_NAMES  # noqa: E402  (benchmarks/_models.py)

REPO = Path(__file__).resolve().parents[1]
SHARED_ORACLES = REPO.parent / "shared" / "oracles"
TARGET_RATIO = 0.25
#: methods with an official comparison: oracle script, peer folders it needs, its sidecar's timing key
OFFICIAL = {
    "repq_vit": ("repqvit_oracle.py", ("RepQ-ViT/classification", "timm-0.4.12"), "calibration_incl_reparam"),
    "erq": ("erq_oracle.py", ("ERQ", "timm-0.4.12"), "calibration"),
}


def oracle_options(method: str) -> list[str]:
    """Oracle arguments that make the official run use our YAML's protocol (ERQ's coe; its argparse default differs)."""
    return ["--coe", str(method_defaults("erq")["coe"])] if method == "erq" else []


def default_peer_root() -> Path:
    return Path(os.environ["PEER_ROOT"]) if os.environ.get("PEER_ROOT") else REPO.parent / "peers"


def time_ours(model_name: str, calib_size: int, seed: int, bits: BitWidth, method: str = "repq_vit",
              depth: Optional[int] = None, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(wall, process CPU) seconds of our calibration (``depth``: only the first blocks, as the oracles' --depth)."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **({"depth": depth} if depth else {})).eval().to(device)
    calib = torch.randn((calib_size, 3, 224, 224), generator=torch.Generator().manual_seed(seed + 1000)).to(device)
    now = clock(device)
    start = now()
    build_method(method, bits).quantize(model, image_calibration(calib))
    end = now()
    return end[0] - start[0], end[1] - start[1]


def sidecar_path(timings_dir: Path, method: str, short: str, calib_size: int, seed: int, bits: BitWidth, threads: int) -> Path:
    prefix = OFFICIAL[method][0].removesuffix("_oracle.py")
    return timings_dir / f"{prefix}_{short}_w{bits.w}a{bits.a}_c{calib_size}_t{threads}_seed{seed}.json"


def check_peer_setup(peer_root: Path, oracles: Path, method: str) -> None:
    """One line saying what is missing, before any work."""
    script_name, folders, _ = OFFICIAL[method]
    script = oracles / script_name
    if not script.is_file():
        raise SystemExit(f"error: no {method} oracle at {script} (pass --oracles, the folder of shared/oracles)")
    missing = [peer_root / folder for folder in folders if not (peer_root / folder).is_dir()]
    if missing:
        raise SystemExit(
            f"error: no official {method} setup under the peer root {peer_root} (missing {', '.join(map(str, missing))}): "
            f"set one up as {oracles / 'README.md'} 'Setup' says and pass --peer-root or set PEER_ROOT, "
            "or use --official recorded / skip"
        )


def run_official(peer_root: Path, oracles: Path, python: str, method: str, model_name: str, calib_size: int, seed: int,
                 bits: BitWidth, threads: int, sidecar: Path) -> dict:
    """Run the official calibration now through the oracle; its JSON sidecar (kept at ``sidecar``)."""
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    out = sidecar.with_suffix(".npz")
    cmd = [python, str(oracles / OFFICIAL[method][0]), "--model", model_name, "--seed", str(seed),
           "--w-bits", str(bits.w), "--a-bits", str(bits.a), "--calib-size", str(calib_size),
           "--eval-size", "1", "--threads", str(threads), "--out", str(out), *oracle_options(method)]
    # output is not captured: the oracle's progress and any error reach the terminal as they happen
    done = subprocess.run(cmd, cwd=oracles, env=dict(os.environ, PEER_ROOT=str(peer_root.resolve())))
    if done.returncode != 0:
        raise SystemExit(f"error: the official {method} oracle failed (exit {done.returncode}): {' '.join(cmd)}")
    out.unlink(missing_ok=True)  # tensors are not needed here, only the timings
    return json.loads(sidecar.read_text())


def official_timings(meta: dict, method: str) -> tuple[float, Optional[float]]:
    timings, key = meta["timings_s"], OFFICIAL[method][2]
    return timings[key], timings.get(f"{key}_cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"], choices=sorted(TIMM_NAMES))
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--official", choices=["auto", "run", "recorded", "skip"], default="auto")
    parser.add_argument("--peer-root", type=Path, default=None, help="default: $PEER_ROOT, else ../peers")
    parser.add_argument("--peer-python", default=None, help="default: <peer root>/venv/bin/python if it exists, else this interpreter")
    parser.add_argument("--oracles", type=Path, default=SHARED_ORACLES, help="the shared oracle scripts (default ../shared/oracles)")
    parser.add_argument("--timings-dir", type=Path, default=REPO / "outputs" / "benchmarks" / "oracle_timing")
    parser.add_argument("--method", default="repq_vit", help=f"ours: any method (official comparisons: {', '.join(OFFICIAL)})")
    parser.add_argument("--depth", type=int, default=None, help="ours: keep only the first blocks")
    parser.add_argument("--device", default="cpu", help="ours (the official oracle runs on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()
    bits = BitWidth(4, 4)
    device = torch.device(args.device)
    if args.official == "auto" and (args.method not in OFFICIAL or args.depth or device.type != "cpu"):
        args.official = "skip"
    if args.official != "skip" and (args.method not in OFFICIAL or args.depth or device.type != "cpu"):
        raise SystemExit(f"error: the official comparisons ({', '.join(OFFICIAL)}) are full depth, on the CPU: use "
                         "--official skip with another --method, --depth or --device")
    peer_root = args.peer_root or default_peer_root()
    python = args.peer_python or str(peer_root / "venv" / "bin" / "python")
    if args.peer_python is None and not Path(python).exists():
        python = sys.executable
    if args.official == "auto":
        try:
            check_peer_setup(peer_root, args.oracles, args.method)
            args.official = "run"
        except SystemExit as missing:
            print(f"{str(missing).removeprefix('error: ')}; timing ours alone", flush=True)
            args.official = "skip"
    if args.official == "run":
        check_peer_setup(peer_root, args.oracles, args.method)
    sidecars = {s: sidecar_path(args.timings_dir, args.method, s, args.calib_size, args.seed, bits, args.threads) for s in args.models}
    if args.official == "recorded":
        missing = [str(p) for p in sidecars.values() if not p.is_file()]
        if missing:
            raise SystemExit(f"error: no recorded official timing {', '.join(missing)}: run with --official run first")
    torch.set_num_threads(args.threads)
    depth = f", first {args.depth} blocks" if args.depth else ""
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, {args.method} {bits.label}, "
          f"{args.calib_size} calibration images{depth}")
    rows = []
    for short in args.models:
        name = TIMM_NAMES[short]
        ours_wall, ours_cpu = time_ours(name, args.calib_size, args.seed, bits, args.method, args.depth, device)
        row = {"model": short, "method": args.method, "depth": args.depth, "ours_wall_s": ours_wall, "ours_cpu_s": ours_cpu}
        line = f"{short}: ours {ours_wall:.2f} s wall / {ours_cpu:.2f} s CPU"
        if args.official != "skip":
            if args.official == "run":
                meta = run_official(peer_root, args.oracles, python, args.method, name, args.calib_size, args.seed, bits, args.threads, sidecars[short])
            else:
                meta = json.loads(sidecars[short].read_text())
            off_wall, off_cpu = official_timings(meta, args.method)
            row.update({"official_wall_s": off_wall, "official_cpu_s": off_cpu, "official": args.official,
                        "peer_commit": meta.get("peer_commit")})
            line += f" | official ({args.official}) {off_wall:.2f} s wall"
            if off_cpu is not None:
                line += f" / {off_cpu:.2f} s CPU | ratio (CPU) {ours_cpu / off_cpu:.3f} (target <= {TARGET_RATIO})"
            line += f" | ratio (wall) {ours_wall / off_wall:.3f}"
        rows.append(row)
        print(line, flush=True)
        if args.json:  # after every model: a run stopped at its time limit keeps what it measured
            args.json.write_text(json.dumps({"torch": torch.__version__, "device": args.device, "threads": args.threads,
                                             "calib_size": args.calib_size, "target": TARGET_RATIO, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
