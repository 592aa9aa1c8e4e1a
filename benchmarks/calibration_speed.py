"""Calibration time of RepQ-ViT, ERQ, AdaLog or APHQ-ViT: ours vs the official code (zkkli/RepQ-ViT, zysxmu/ERQ,
GoatWu/AdaLog, GoatWu/APHQ-ViT), same models, inputs and thread count.

Ours: ``RepQViT.quantize`` (module swap, calibration forward, reparameterization, weight refit) on a random-init
timm model with ``--calib-size`` seeded N(0, 1) images (the oracles' convention). Official: the RepQ-ViT oracle of
``../shared/oracles/repqvit_oracle.py`` (the official ``test_quant.main()`` with I/O patches only), run in a
subprocess right after ours, with the same seed, bits, calibration size and threads; its JSON sidecar gives the
window "calibration_incl_reparam" (quant_model + initial calibration + reparameterization + re-calibration) in wall
and process CPU seconds. Process CPU seconds are the figure to trust on a shared machine. ``--method erq`` does the
same with this repository's ``oracles/erq_oracle.py`` on our model's FP weights (``--init-weights``; window
"calibration": quantizer wrapping, activation calibration, reparameterization, FP capture, Aqer, weight calibration,
Wqer) at our YAML's coe. ``--method adalog`` runs
``../shared/oracles/adalog_family_oracle.py --method adalog`` (window "calibration": the official ``--calibrate``
search of every layer and the bias fold) on our model's FP weights, saved for it (``--init-weights``), since the
official code's timm 0.9.2 initializes otherwise; it (and aphq_vit) alone take ``--depth`` (the first blocks, as its
``--depth``): the official search is too slow on a CPU for more (deit_tiny, first block, 4 images: minutes).
``--method aphq_vit`` does the same with ``--method aphqvit`` (the official ``--calibrate`` search alone; ours with
``iters=0 reconstruct_mlp=false``, the calibration QDrop and FIMA-Q share); the oracle spells APHQ-ViT's
``--val-batch-size`` as ``--val-batchsize``, so it runs under a launcher that only corrects that spelling.

The official code lives outside the repository, in a peer root set up once as ../shared/oracles/README.md "Setup"
says (``<peer root>/RepQ-ViT`` and ``<peer root>/timm-0.4.12``; the interpreter is ``<peer root>/venv/bin/python``
when it exists, else this one). The peer root is ``--peer-root``, else ``$PEER_ROOT``, else ``../peers`` beside
the clone. The oracle scripts are in ``--oracles`` when given, else, per method, in this repository's ``oracles/``
(ERQ) or ``../shared/oracles`` (the others). ``--official run`` keeps each oracle
sidecar in ``--timings-dir`` (default ``outputs/benchmarks/oracle_timing``, ignored by git); ``--official recorded``
reuses those files instead of running the official code again, and ``--official skip`` times ours alone. The default,
``auto``, runs the official code when the peer root has it and otherwise times ours alone, saying so (a fresh clone
with ../shared/ only).

    python benchmarks/calibration_speed.py --models deit_tiny deit_small [--official auto|run|recorded|skip]
    python benchmarks/calibration_speed.py --official skip --method ptq4vit --depth 1 [--device cuda]
    python benchmarks/calibration_speed.py --method adalog --models deit_tiny --depth 1 --calib-size 4
    python benchmarks/calibration_speed.py --method aphq_vit --models deit_tiny --depth 1 --calib-size 8
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
    "adalog": ("adalog_family_oracle.py", ("AdaLog", "timm-0.9.2"), "calibration"),
    "aphq_vit": ("adalog_family_oracle.py", ("APHQ-ViT", "timm-0.9.2"), "calibration"),
}
#: methods whose oracle takes --depth and our FP weights (--init-weights)
OFFICIAL_AT_DEPTH = {"adalog", "aphq_vit"}
#: our options that make a method's run the official calibration alone
CALIBRATION_ONLY = {"aphq_vit": {"iters": 0, "reconstruct_mlp": False}}
#: the oracle's name of a method (adalog_family_oracle.py --method)
ORACLE_METHOD = {"adalog": "adalog", "aphq_vit": "aphqvit"}
#: runs ``<script> <args>`` with the oracle's --val-batchsize spelled as APHQ-ViT's parser has it (--val-batch-size)
APHQ_SPELLING = """import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def spelled(self, args=None, namespace=None):
    args = None if args is None else ["--val-batch-size" if a == "--val-batchsize" else a for a in args]
    return parse(self, args, namespace)
argparse.ArgumentParser.parse_args = spelled
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
#: methods whose oracle script is in this repository's oracles/ (the others': ../shared/oracles), unless --oracles
REPO_ORACLES = ("erq",)
#: methods whose oracle runs on our model's FP weights, saved for its --init-weights
INIT_WEIGHTS = OFFICIAL_AT_DEPTH | {"erq"}


def oracle_options(method: str, depth: Optional[int], init_weights: Optional[Path]) -> list[str]:
    """Oracle arguments that make the official run use our YAML's protocol (ERQ's coe; its argparse default differs),
    the AdaLog family's method, depth and FP weights."""
    if method == "erq":
        return ["--coe", str(method_defaults("erq")["coe"]), "--init-weights", str(init_weights)]
    if method in ORACLE_METHOD:
        return ["--method", ORACLE_METHOD[method], *(["--depth", str(depth)] if depth else []), "--init-weights", str(init_weights)]
    return []


def default_peer_root() -> Path:
    return Path(os.environ["PEER_ROOT"]) if os.environ.get("PEER_ROOT") else REPO.parent / "peers"


def default_oracles(method: str, peer_root: Path) -> Path:
    """The folder of ``method``'s oracle script when --oracles is not given."""
    return REPO / "oracles" if method in REPO_ORACLES else SHARED_ORACLES


def time_ours(model_name: str, calib_size: int, seed: int, bits: BitWidth, method: str = "repq_vit",
              depth: Optional[int] = None, device: torch.device = torch.device("cpu"),
              save_weights: Optional[Path] = None) -> tuple[float, float]:
    """(wall, process CPU) seconds of our calibration (``depth``: only the first blocks, as the oracles' --depth);
    ``save_weights``: also save the FP state dict there (for the oracle's --init-weights)."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **({"depth": depth} if depth else {})).eval().to(device)
    if save_weights is not None:
        save_weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, save_weights)
    calib = torch.randn((calib_size, 3, 224, 224), generator=torch.Generator().manual_seed(seed + 1000)).to(device)
    now = clock(device)
    start = now()
    build_method(method, bits, **CALIBRATION_ONLY.get(method, {})).quantize(model, image_calibration(calib))
    end = now()
    return end[0] - start[0], end[1] - start[1]


def sidecar_path(timings_dir: Path, method: str, short: str, calib_size: int, seed: int, bits: BitWidth, threads: int,
                 depth: Optional[int] = None) -> Path:
    prefix = method if method in OFFICIAL_AT_DEPTH else OFFICIAL[method][0].removesuffix("_oracle.py")
    blocks = f"_d{depth}" if depth else ""
    return timings_dir / f"{prefix}_{short}{blocks}_w{bits.w}a{bits.a}_c{calib_size}_t{threads}_seed{seed}.json"


def check_peer_setup(peer_root: Path, oracles: Path, method: str) -> None:
    """One line saying what is missing, before any work."""
    script_name, folders, _ = OFFICIAL[method]
    script = oracles / script_name
    if not script.is_file():
        raise SystemExit(f"error: no {method} oracle at {script} (pass --oracles, the folder that holds {script_name})")
    missing = [peer_root / folder for folder in folders if not (peer_root / folder).is_dir()]
    if missing:
        raise SystemExit(
            f"error: no official {method} setup under the peer root {peer_root} (missing {', '.join(map(str, missing))}): "
            f"set one up as {oracles / 'README.md'} 'Setup' says and pass --peer-root or set PEER_ROOT, "
            "or use --official recorded / skip"
        )


def run_official(peer_root: Path, oracles: Path, python: str, method: str, model_name: str, calib_size: int, seed: int,
                 bits: BitWidth, threads: int, sidecar: Path, depth: Optional[int] = None) -> dict:
    """Run the official calibration now through the oracle; its JSON sidecar (kept at ``sidecar``)."""
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    out = sidecar.with_suffix(".npz")
    launcher = ["-c", APHQ_SPELLING] if method == "aphq_vit" else []
    cmd = [python, *launcher, str(oracles / OFFICIAL[method][0]), "--model", model_name, "--seed", str(seed),
           "--w-bits", str(bits.w), "--a-bits", str(bits.a), "--calib-size", str(calib_size),
           "--eval-size", "1", "--threads", str(threads), "--out", str(out.resolve()),
           *oracle_options(method, depth, init_weights_path(sidecar))]
    # output is not captured: the oracle's progress and any error reach the terminal as they happen
    done = subprocess.run(cmd, cwd=oracles, env=dict(os.environ, PEER_ROOT=str(peer_root.resolve())))
    if done.returncode != 0:
        raise SystemExit(f"error: the official {method} oracle failed (exit {done.returncode}): {' '.join(cmd)}")
    if method not in OFFICIAL_AT_DEPTH:  # the AdaLog family's tensors stay, for python -m ptq_bench.compare --oracle <it>
        out.unlink(missing_ok=True)  # tensors are not needed here, only the timings
    return json.loads(sidecar.read_text())


def init_weights_path(sidecar: Path) -> Path:
    """Where our FP weights are saved for the oracle's --init-weights (beside its sidecar)."""
    return sidecar.with_name(sidecar.stem + "_init.pt")


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
    parser.add_argument("--oracles", type=Path, default=None,
                        help="folder of the oracle script (default: this repository's oracles/ for erq, ../shared/oracles otherwise)")
    parser.add_argument("--timings-dir", type=Path, default=REPO / "outputs" / "benchmarks" / "oracle_timing")
    parser.add_argument("--method", default="repq_vit", help=f"ours: any method (official comparisons: {', '.join(OFFICIAL)})")
    parser.add_argument("--depth", type=int, default=None, help="ours: keep only the first blocks")
    parser.add_argument("--device", default="cpu", help="ours (the official oracle runs on the CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()
    bits = BitWidth(4, 4)
    device = torch.device(args.device)
    unsupported = args.method not in OFFICIAL or (args.depth and args.method not in OFFICIAL_AT_DEPTH) or device.type != "cpu"
    if args.official == "auto" and unsupported:
        args.official = "skip"
    if args.official != "skip" and unsupported:
        raise SystemExit(f"error: the official comparisons ({', '.join(OFFICIAL)}) run on the CPU, at full depth but for "
                         f"{', '.join(sorted(OFFICIAL_AT_DEPTH))}: use --official skip with another --method, --depth or --device")
    peer_root = args.peer_root or default_peer_root()
    python = args.peer_python or str(peer_root / "venv" / "bin" / "python")
    if args.peer_python is None and not Path(python).exists():
        python = sys.executable
    oracles = args.oracles or default_oracles(args.method, peer_root)
    if args.official == "auto":
        try:
            check_peer_setup(peer_root, oracles, args.method)
            args.official = "run"
        except SystemExit as missing:
            print(f"{str(missing).removeprefix('error: ')}; timing ours alone", flush=True)
            args.official = "skip"
    if args.official == "run":
        check_peer_setup(peer_root, oracles, args.method)
    sidecars = {s: sidecar_path(args.timings_dir, args.method, s, args.calib_size, args.seed, bits, args.threads, args.depth)
                for s in args.models}
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
        weights = init_weights_path(sidecars[short]) if args.official == "run" and args.method in INIT_WEIGHTS else None
        ours_wall, ours_cpu = time_ours(name, args.calib_size, args.seed, bits, args.method, args.depth, device, weights)
        row = {"model": short, "method": args.method, "depth": args.depth, "ours_wall_s": ours_wall, "ours_cpu_s": ours_cpu}
        line = f"{short}: ours {ours_wall:.2f} s wall / {ours_cpu:.2f} s CPU"
        if args.official != "skip":
            if args.official == "run":
                meta = run_official(peer_root, oracles, python, args.method, name, args.calib_size, args.seed, bits, args.threads,
                                    sidecars[short], args.depth)
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
