"""Regenerate the measured sections of docs/performance.md: run the speed benchmarks, then write their tables and the
cost of regenerating RepQ-ViT's, DopQ-ViT's and AIQViT's ImageNet tables computed from them.

Each benchmark runs as its own process, exactly as its docstring says (benchmarks/eval_overhead.py,
benchmarks/reconstruction_speed.py, benchmarks/calibration_speed.py), writing JSON under ``--work-dir``; this script
then replaces the text between ``<!-- measured:<name> -->`` and ``<!-- /measured:<name> -->`` in ``--out`` and
leaves the rest of the page alone. The official-code columns need a peer root set up as ../shared/oracles/README.md
says (``$PEER_ROOT``, else ``../peers``; RepQ-ViT and IaS-ViT); without one they are left out and the page says so.
``--from-json`` rebuilds the page from an earlier run's JSON without measuring. ``--gpu-dir`` also writes the GPU
section (measured by benchmarks/gpu_check.sh on a CUDA machine, whose output folder it names) and the cost of the
paper tables on GPUs computed from it.

    python benchmarks/performance_report.py [--quick] [--peer-root DIR] [--device cpu] [--out docs/performance.md]
    python benchmarks/performance_report.py --from-json --gpu-dir outputs/gpu_check

About an hour on the 2-core development machine (``--quick``: about 20 minutes, fewer repeats and iterations).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

#: GMACs per 224² image (timm's model cards) and blocks: the extrapolation from the measured models (deit_tiny,
#: deit_small) to the others assumes time proportional to multiply-adds.
GFLOPS = {"deit_tiny": 1.3, "deit_small": 4.6, "vit_small": 4.6, "deit_base": 17.6, "vit_base": 17.6,
          "swin_tiny": 4.5, "swin_small": 8.7, "swin_base": 15.4}
BLOCKS = {"deit_tiny": 12, "deit_small": 12, "vit_small": 12, "deit_base": 12, "vit_base": 12,
          "swin_tiny": 12, "swin_small": 24, "swin_base": 24}
SEVEN = ["vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base", "swin_small", "swin_base"]
#: Runs of each paper's ImageNet table that this project runs (its rows × models × bit-widths; FP once per model).
TABLES = {
    "RepQ-ViT Table 1": {"method": "repq_vit", "models": SEVEN, "runs": {"fp": 1, "ptq4vit": 2, "repq_vit": 2}},  # W4A4, W6A6
    "DopQ-ViT main table": {"method": "dopq_vit", "models": SEVEN,
                            "runs": {"fp": 1, "ptq4vit": 2, "repq_vit": 3, "dopq_vit": 3}},  # W3A3 too (PTQ4ViT: none)
    "AIQViT Table 1": {"method": "aiqvit", "models": SEVEN, "runs": {"fp": 1, "ptq4vit": 2, "repq_vit": 3, "aiqvit": 3}},
}
#: Protocols (conf/method/*.yaml, conf/data/imagenet): images evaluated, calibration images, iterations per block.
EVAL_IMAGES = 50_000
PROTOCOL = {"dopq_vit": {"calib": 1024, "iters": 1000, "batch": 32},
            "aiqvit": {"calib": 1024, "search_iters": 2000, "iters": 6000, "batch": 24}}


def run(cmd: list[str], log: Path) -> None:
    """Run a benchmark; its output goes to the terminal and to ``log``."""
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as handle:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            handle.write(line)
        if process.wait() != 0:
            raise SystemExit(f"error: {cmd[1]} failed (exit {process.returncode}); its output is in {log}")


def peer_root(arg: Optional[Path]) -> Path:
    return arg or (Path(os.environ["PEER_ROOT"]) if os.environ.get("PEER_ROOT") else REPO.parent / "peers")


def measure(args: argparse.Namespace, work: Path) -> None:
    py = sys.executable
    peers = peer_root(args.peer_root)
    quick = args.quick
    run([py, str(BENCH / "eval_overhead.py"), "--device", args.device, "--repeats", "6" if quick else "15",
         "--threads", *(["1"] if quick else ["1", "2"]), "--json", str(work / "eval.json")], work / "eval.log")
    run([py, str(BENCH / "eval_overhead.py"), "--device", args.device, "--compile", "--repeats", "5" if quick else "10",
         "--threads", "1", "--json", str(work / "eval_compile.json")], work / "eval_compile.log")
    recon = [py, str(BENCH / "reconstruction_speed.py"), "--device", args.device, "--iters", "10" if quick else "25",
             "--rounds", "1" if quick else "2", "--json", str(work / "recon.json")]
    if args.device == "cpu" and (peers / "IaS-ViT").is_dir():
        recon += ["--official", str(peers)]
    run(recon, work / "recon.log")
    if not quick and args.device == "cpu":
        run([py, str(BENCH / "reconstruction_speed.py"), "--threads", "2", "--iters", "25", "--json", str(work / "recon_t2.json")],
            work / "recon_t2.log")
    official = "run" if args.device == "cpu" and (peers / "RepQ-ViT").is_dir() else "skip"
    run([py, str(BENCH / "calibration_speed.py"), "--device", args.device, "--official", official, "--peer-root", str(peers),
         "--json", str(work / "calib.json")], work / "calib.log")
    run([py, str(BENCH / "calibration_speed.py"), "--device", args.device, "--official", "skip", "--method", "ptq4vit",
         "--depth", "1", "--models", "deit_tiny", "--json", str(work / "calib_ptq4vit_d1.json")], work / "calib_ptq4vit.log")


def load(work: Path, name: str) -> Optional[dict[str, Any]]:
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}; "
            f"load average {load1:.1f} when the page was written ({datetime.date.today().isoformat()})")


# ------------------------------------------------------------------------------------------------ tables


def eval_table(data: dict[str, Any]) -> str:
    lines = [
        f"torch {data['torch']}, timm {data['timm']}, device {data['device']}, W4A4, batch "
        f"{data['rows'][0]['batch_size']}, {data['rows'][0]['repeats']} interleaved rounds. Ratios: median of the "
        "per-round ratios (interquartile range / median in brackets); at 1 thread process CPU time, at 2 threads CPU "
        "time too (the wall-clock ratio is in the benchmark's JSON).",
        "",
        "| model | method | threads | FP fused (s/batch) | quant / FP fused | quant / FP explicit | FP explicit / FP fused "
        "| quantizers off / FP fused | target ≤ 1.1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        def c(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.3f} ({r[key + '_iqr']:.0%})"

        met = "yes" if r["quant/fp_fused"] <= data.get("target", 1.1) else "no"
        lines.append(f"| {r['model']} | {r['method']} | {r['threads']} | {r['fp_fused_s']:.2f} | {c('quant/fp_fused')} | "
                     f"{c('quant/fp_explicit')} | {c('fp_explicit/fp_fused')} | {c('quant_off/fp_fused')} | {met} |")
    return "\n".join(lines)


def recon_table(data: dict[str, Any], data_t2: Optional[dict[str, Any]]) -> str:
    lines = [
        f"torch {data['torch']}, device {data['device']}, {data['bits']}, batch {data['batch_size']}, {data['iters']} "
        f"iterations per block and loop, {data['rounds']} round(s); per-iteration process CPU time at 1 thread (median "
        "over blocks and rounds; IQR / median in brackets); wall-clock iterations per second at 2 threads beside.",
        "",
        "| model | loop | blocks | it/s (1 thread, CPU time) | ms / iteration | it/s (2 threads, wall) |",
        "|---|---|---|---|---|---|",
    ]
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        grouped.setdefault((r["model"], r["loop"]), []).append(r)
    two = {}
    if data_t2:
        for r in data_t2["rows"]:
            two.setdefault((r["model"], r["loop"]), []).append(r["wall_it_per_s"])
    for (model, loop), rows in grouped.items():
        median = sorted(r["median_s"] for r in rows)[len(rows) // 2]
        spread = max(r["iqr_rel"] for r in rows)
        wall2 = f"{sorted(two[(model, loop)])[len(two[(model, loop)]) // 2]:.1f}" if (model, loop) in two else "–"
        lines.append(f"| {model} | {loop} | {rows[0]['blocks']} | {1 / median:.1f} | {median * 1e3:.0f} ({spread:.0%}) | {wall2} |")
    if data.get("official"):
        ref = data["official"][0]
        lines += ["", f"Official I&S-ViT block reconstruction ({ref['peer']} @ {ref['commit'][:7]}, timm {ref['timm']}, "
                  f"torch {ref['torch']}), deit_tiny block 0, batch {ref['batch_size']}, same thread count, run right after "
                  "ours in each round:", "",
                  "| official loop | ms / iteration (median over rounds) | ours / official, per round |", "|---|---|---|"]
        for stage, what in (("1", "stage 1: activations quantized, weights FP and learned"),
                            ("3", "stage 3: weights and activations quantized (as in our loops)")):
            medians = [official_median(r, stage, data.get("warmup", 3)) for r in data["official"]]
            ratios = ""
            if stage == "3":
                ratios = "; ".join(f"{loop} {', '.join(f'{v:.2f}' for v in values)}"
                                   for loop, values in data.get("ratios_vs_official_stage3", {}).items())
            lines.append(f"| {what} | {sorted(medians)[len(medians) // 2] * 1e3:.0f} | {ratios} |")
    else:
        lines += ["", "The official I&S-ViT loop was not run (no peer root with IaS-ViT): see benchmarks/peers/ias_block_speed.py."]
    return "\n".join(lines)


def official_median(ref: dict[str, Any], stage: str, warmup: int = 3) -> float:
    """Median seconds per iteration of one official I&S-ViT stage (CPU time on a CPU, synchronized wall on a GPU)."""
    times = sorted(ref[f"stage{stage}_iter_{ref.get('clock', 'cpu')}_s"][warmup:])
    return times[len(times) // 2]


def calib_table(data: dict[str, Any], ptq4vit: Optional[dict[str, Any]]) -> str:
    lines = [f"torch {data['torch']}, device {data['device']}, {data['threads']} thread(s), {data['calib_size']} calibration "
             "images, W4A4, random-init weights, seeded N(0, 1) images.", "",
             "| model | method | ours (CPU s) | official (CPU s) | ours / official (CPU) |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        off = r.get("official_cpu_s")
        off_cell = f"{off:.1f} ({r.get('official')})" if off else "not run"
        ratio = f"{r['ours_cpu_s'] / off:.3f}" if off else "–"
        lines.append(f"| {r['model']} | {r.get('method', 'repq_vit')} | {r['ours_cpu_s']:.1f} | {off_cell} | {ratio} |")
    if ptq4vit:
        for r in ptq4vit["rows"]:
            lines.append(f"| {r['model']}, first {r['depth']} block(s) | ptq4vit | {r['ours_cpu_s']:.1f} | – | – |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ costs


def per_image(eval_data: dict[str, Any], key: str) -> dict[str, float]:
    """CPU seconds per image at 1 thread (worst method) for the measured models."""
    out: dict[str, float] = {}
    for r in eval_data["rows"]:
        if r["threads"] == 1:
            out[r["model"]] = max(out.get(r["model"], 0.0), r[key] / r["batch_size"])
    return out


def scaled(measured: dict[str, float], model: str) -> float:
    """Measured value for ``model``, else deit_small's (the largest measured) scaled by FLOPs."""
    if model in measured:
        return measured[model]
    base = "deit_small" if "deit_small" in measured else next(iter(measured))
    return measured[base] * GFLOPS[model] / GFLOPS[base]


def run_costs(eval_data: dict[str, Any], recon: dict[str, Any], calib: dict[str, Any], ptq4vit: Optional[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """CPU hours (1 thread) per run of each method on each model."""
    fp_img, q_img = per_image(eval_data, "fp_fused_s"), per_image(eval_data, "quant_s")
    repq = {r["model"]: r["ours_cpu_s"] for r in calib["rows"]}
    iteration: dict[str, float] = {}
    for r in recon["rows"]:
        if r["model"] == "deit_tiny":
            iteration[r["loop"]] = min(iteration.get(r["loop"], float("inf")), r["median_s"])
    ptq4vit_block = ptq4vit["rows"][0]["ours_cpu_s"] if ptq4vit else None
    costs: dict[str, dict[str, float]] = {}
    for model in GFLOPS:
        per_block = GFLOPS[model] / GFLOPS["deit_tiny"] * 12 / BLOCKS[model]  # block FLOPs relative to deit_tiny's
        eval_q = EVAL_IMAGES * scaled(q_img, model)
        c = {"fp": EVAL_IMAGES * scaled(fp_img, model), "repq_vit": scaled(repq, model) + eval_q}
        if ptq4vit_block is not None:
            c["ptq4vit"] = ptq4vit_block * per_block * BLOCKS[model] + eval_q
        # block captures: for block b, the model runs up to b on every calibration image, twice (FP target, quantized
        # input): about (blocks + 1) full forwards of the calibration set
        capture = (BLOCKS[model] + 1) * scaled(q_img, model)
        d = PROTOCOL["dopq_vit"]
        if "dopq" in iteration:
            c["dopq_vit"] = (scaled(repq, model) + d["calib"] * capture
                             + BLOCKS[model] * d["iters"] * iteration["dopq"] * per_block + eval_q)
        a = PROTOCOL["aiqvit"]
        if "aiqvit" in iteration and "aiqvit_search" in iteration:
            batch = a["batch"] / 32  # measured at batch 32
            c["aiqvit"] = (d["calib"] * capture + BLOCKS[model] * per_block * batch
                           * (a["search_iters"] * iteration["aiqvit_search"] + a["iters"] * iteration["aiqvit"]) + eval_q)
        costs[model] = {k: v / 3600 for k, v in c.items()}
    return costs


def table_totals(costs: dict[str, dict[str, float]], spec: dict[str, Any]) -> tuple[float, float, float, int, set[str]]:
    """Hours of all runs of one paper table, of its own method's runs, its longest run; run count; unmeasured methods."""
    total, own, longest, runs, missing = 0.0, 0.0, 0.0, 0, set()
    for model in spec["models"]:
        for method, count in spec["runs"].items():
            if method not in costs[model]:
                missing.add(method)
                continue
            hours = costs[model][method]
            total += count * hours
            runs += count
            longest = max(longest, hours)
            if method == spec["method"]:
                own += count * hours
    return total, own, longest, runs, missing


def cost_table(costs: dict[str, dict[str, float]]) -> str:
    lines = ["| table | runs | CPU hours, all runs (1 thread) | of which the paper's own method | longest run (h) | "
             "wall on this 2-core machine (2 runs at a time) | wall on 8 / 64 parallel 1-core workers |", "|---|---|---|---|---|---|---|"]
    for name, spec in TABLES.items():
        total, own, longest, runs, missing = table_totals(costs, spec)
        note = f" (without {', '.join(sorted(missing))}: not measured)" if missing else ""
        lines.append(f"| {name}{note} | {runs} | {total:,.0f} | {own:,.0f} | {longest:.1f} | {max(total / 2, longest):,.0f} h "
                     f"| {max(total / 8, longest):,.0f} h / {max(total / 64, longest):,.0f} h |")
    per_model = ["", "Per run, CPU hours at 1 thread (ImageNet: 50,000 evaluation images; DopQ-ViT and AIQViT at their "
                 "protocols: 1,024 images, 1,000 iterations per block; 2,000 + 6,000 iterations at batch 24):", "",
                 "| model | " + " | ".join(k for k in ("fp", "repq_vit", "ptq4vit", "dopq_vit", "aiqvit")) + " |",
                 "|---|---|---|---|---|---|"]
    for model in SEVEN:
        c = costs[model]
        per_model.append(f"| {model} | " + " | ".join(f"{c[k]:.1f}" if k in c else "–"
                                                       for k in ("fp", "repq_vit", "ptq4vit", "dopq_vit", "aiqvit")) + " |")
    return "\n".join(lines + per_model)

# ------------------------------------------------------------------------------------------------ GPU


def last_matching_line(path: Path, pattern: str) -> str:
    """The last line of ``path`` matching ``pattern`` (pytest's summary, nvidia-smi's GPU line), or ''."""
    if not path.is_file():
        return ""
    found = [line.strip() for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
    return found[-1] if found else ""


def compiled_table(data: dict[str, Any]) -> str:
    """``eval_overhead.py --compile``: the quantized model through torch.compile as ``eval_compile=true`` runs it, the
    FP model compiled beside it, interleaved with the eager variants."""
    row = data["rows"][0]
    clock = "synchronized wall time" if data["device"].startswith("cuda") else f"process CPU time at {row['threads']} thread(s)"
    lines = [f"torch {data['torch']}, device {data['device']}, W4A4, batch {row['batch_size']}, {row['repeats']} interleaved "
             f"rounds, {clock}; ratios: median of per-round ratios (IQR / median); compile seconds: the first call's extra "
             "wall time (inductor's disk cache may be warm for a graph compiled before).", "",
             "| model | method | quant (eager) / FP fused | quant compiled / FP fused | quant compiled / FP explicit "
             "| quant compiled / FP compiled | FP compiled / FP fused | compile s (FP, quantized) | target ≤ 1.1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        met = "yes" if r["quant_compiled/fp_fused"] <= data.get("target", 1.1) else "no"
        lines.append(f"| {r['model']} | {r['method']} | {r['quant/fp_fused']:.3f} ({r['quant/fp_fused_iqr']:.0%}) | "
                     f"{r['quant_compiled/fp_fused']:.3f} ({r['quant_compiled/fp_fused_iqr']:.0%}) | "
                     f"{r['quant_compiled/fp_explicit']:.3f} | {r['quant_compiled/fp_compiled']:.3f} | "
                     f"{r['fp_compiled/fp_fused']:.3f} | {r['fp_compiled_compile_s']:.0f}, {r['quant_compiled_compile_s']:.0f} | {met} |")
    return "\n".join(lines)


def mib(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:,.0f}" if key in row else "–"


def gpu_section(gpu: Path) -> str:
    """Section 5 from a benchmarks/gpu_check.sh output folder."""
    env = (gpu / "env.txt").read_text().strip() if (gpu / "env.txt").is_file() else "environment not recorded"
    tests = last_matching_line(gpu / "pytest.txt", r"\d+ (passed|failed)") or "the test suite was not run"
    lines = [f"Measured by `benchmarks/gpu_check.sh` on {env}. Test suite there: `{tests}`.", ""]
    eval_data = load(gpu, "eval")
    if eval_data:
        batch = eval_data["rows"][0]["batch_size"]
        lines += [f"**Evaluation** (`eval_overhead.py --device cuda`, batch {batch}, {eval_data['rows'][0]['repeats']} "
                  "interleaved rounds, synchronized wall time; images per second of the median batch; ratios: median of "
                  "per-round ratios, IQR / median in brackets; peak memory allocated during one batch):", "",
                  "| model | method | FP img/s (fused attention) | FP img/s (explicit) | quantized img/s | quant / FP fused "
                  "| quant / FP explicit | peak MiB FP / quantized |", "|---|---|---|---|---|---|---|---|"]
        for r in eval_data["rows"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['fp_fused_images_per_s']:,.0f} | {r['fp_explicit_images_per_s']:,.0f} "
                         f"| {r['quant_images_per_s']:,.0f} | {r['quant/fp_fused']:.2f} ({r['quant/fp_fused_iqr']:.0%}) "
                         f"| {r['quant/fp_explicit']:.2f} ({r['quant/fp_explicit_iqr']:.0%}) "
                         f"| {mib(r, 'fp_fused_peak_mib')} / {mib(r, 'quant_peak_mib')} |")
    compiled = load(gpu, "eval_compile")
    if compiled:
        lines += ["", "**Compiled evaluation**:", "", compiled_table(compiled)]
    recon = load(gpu, "recon")
    if recon:
        lines += ["", f"**Block reconstruction** (`reconstruction_speed.py --device cuda`, {recon['bits']}, batch "
                  f"{recon['batch_size']}, {recon['iters']} iterations per block, the first {recon.get('warmup', 3)} left "
                  "out; first block of each timm model, the four MNIST-ViT blocks):", "",
                  "| model | loop | it/s | ms / iteration (IQR / median) |", "|---|---|---|---|"]
        for r in recon["rows"]:
            lines.append(f"| {r['model']} | {r['loop']} | {r['it_per_s']:.0f} | {r['median_s'] * 1e3:.1f} ({r['iqr_rel']:.0%}) |")
        for ref in recon.get("official", []):
            stage3 = official_median(ref, "3", recon.get("warmup", 3))
            ours = {r["loop"]: r["median_s"] for r in recon["rows"] if r["model"] == "deit_tiny" and r["round"] == ref["round"]}
            ratio = ", ".join(f"{loop} {t / stage3:.2f}" for loop, t in ours.items())
            lines += ["", f"Official I&S-ViT ({ref['peer']} @ {ref['commit'][:7]}, timm {ref['timm']}, torch {ref['torch']}) on the "
                      f"same device, deit_tiny block 0, batch {ref['batch_size']}: stage 1 {official_median(ref, '1', recon.get('warmup', 3)) * 1e3:.1f} ms, "
                      f"stage 3 {stage3 * 1e3:.1f} ms per iteration; ours / official stage 3: {ratio} (target ≤ 0.5)."]
    calib, ptq4vit = load(gpu, "calib"), load(gpu, "calib_ptq4vit")
    if calib:
        p4 = {r["model"]: r["ours_wall_s"] for r in (ptq4vit or {"rows": []})["rows"]}
        lines += ["", f"**Calibration** (`calibration_speed.py --device cuda`, {calib['calib_size']} images as in the papers, "
                  "W4A4, synchronized wall seconds, block captures and reparameterization included):", "",
                  "| model | RepQ-ViT (s) | PTQ4ViT (s) |", "|---|---|---|"]
        for r in calib["rows"]:
            p4_cell = f"{p4[r['model']]:.1f}" if r["model"] in p4 else "–"
            lines.append(f"| {r['model']} | {r['ours_wall_s']:.1f} | {p4_cell} |")
    table = gpu / "tables" / "table.md"
    if table.is_file():
        lines += ["", "**The CLI on cuda** (`run.py device=cuda model=mnist_vit bits=w4a4`, DopQ-ViT and AIQViT at 50 "
                  "reconstruction iterations per block, not their protocols), the report of its records:", "",
                  table.read_text().strip()]
    return "\n".join(lines)


#: block reconstruction time per iteration of models not measured on the GPU, from a measured one of the same layout:
#: ViT-S/B are DeiT-S/B's blocks; Swin-S's blocks are Swin-T's (same widths per stage), Swin-B's are 128/96 wider
#: (time scaled by the width², never below Swin-T's).
SAME_BLOCKS = {"vit_small": ("deit_small", 1.0), "vit_base": ("deit_base", 1.0), "swin_small": ("swin_tiny", 1.0),
               "swin_base": ("swin_tiny", (128 / 96) ** 2)}


def gpu_run_costs(gpu: Path) -> Optional[dict[str, dict[str, float]]]:
    """GPU hours per run of each method on each model, from a gpu_check.sh folder (measured per model where it can
    be); None when the folder lacks the eval, reconstruction or calibration measurements."""
    eval_data, recon, calib, ptq4vit = load(gpu, "eval"), load(gpu, "recon"), load(gpu, "calib"), load(gpu, "calib_ptq4vit")
    if not (eval_data and recon and calib):
        return None
    fp_img: dict[str, float] = {}
    q_img: dict[str, float] = {}
    for r in eval_data["rows"]:
        fp_img[r["model"]] = 1 / r["fp_fused_images_per_s"]
        q_img[r["model"]] = max(q_img.get(r["model"], 0.0), 1 / r["quant_images_per_s"])  # the slower method
    repq = {r["model"]: r["ours_wall_s"] for r in calib["rows"]}
    iteration: dict[tuple[str, str], float] = {(r["model"], r["loop"]): r["median_s"] for r in recon["rows"]}
    p4_tiny = next((r["ours_wall_s"] for r in (ptq4vit or {"rows": []})["rows"] if r["model"] == "deit_tiny"), None)

    def per_iteration(model: str, loop: str) -> Optional[float]:
        if (model, loop) in iteration:
            return iteration[(model, loop)]
        base, factor = SAME_BLOCKS.get(model, (None, 1.0))
        return iteration[(base, loop)] * factor if (base, loop) in iteration else None

    costs: dict[str, dict[str, float]] = {}
    for model in SEVEN:
        if model not in q_img or model not in repq:
            continue
        eval_q = EVAL_IMAGES * q_img[model]
        c = {"fp": EVAL_IMAGES * fp_img[model], "repq_vit": repq[model] + eval_q}
        if p4_tiny is not None:  # measured on deit_tiny; scaled by multiply-adds, never below deit_tiny's
            c["ptq4vit"] = p4_tiny * max(1.0, GFLOPS[model] / GFLOPS["deit_tiny"]) + eval_q
        capture = (BLOCKS[model] + 1) * q_img[model]  # about blocks + 1 forwards of each calibration image
        d, a = PROTOCOL["dopq_vit"], PROTOCOL["aiqvit"]
        dopq = per_iteration(model, "dopq")
        if dopq is not None:
            c["dopq_vit"] = repq[model] + d["calib"] * capture + BLOCKS[model] * d["iters"] * dopq + eval_q
        search, recon_it = per_iteration(model, "aiqvit_search"), per_iteration(model, "aiqvit")
        if search is not None and recon_it is not None:  # measured at batch 32; AIQViT's 24 costs no more on a GPU
            c["aiqvit"] = a["calib"] * capture + BLOCKS[model] * (a["search_iters"] * search + a["iters"] * recon_it) + eval_q
        costs[model] = {k: v / 3600 for k, v in c.items()}
    return costs


def gpu_cost_table(costs: Optional[dict[str, dict[str, float]]], gpu_name: str) -> str:
    if costs is None:
        return ("Not computed: the GPU folder lacks the evaluation (eval.json) or reconstruction (recon.json) "
                "measurements that the cost is made of (`benchmarks/gpu_check.sh eval recon calib`).")
    lines = ["| table | runs | GPU hours, all runs | of which the paper's own method | longest run (h) | wall on 1 GPU "
             "| wall on 8 GPUs (8 runs at a time) |", "|---|---|---|---|---|---|---|"]
    for name, spec in TABLES.items():
        models = [m for m in spec["models"] if m in costs]
        total, own, longest, runs, missing = table_totals(costs, {**spec, "models": models})
        note = f" (without {', '.join(sorted(missing))}: not measured)" if missing else ""
        lines.append(f"| {name}{note} | {runs} | {total:,.1f} | {own:,.1f} | {longest:.2f} | {total:,.1f} h "
                     f"| {max(total / 8, longest):,.1f} h |")
    methods = ("fp", "repq_vit", "ptq4vit", "dopq_vit", "aiqvit")
    lines += ["", f"Per run, GPU hours on one {gpu_name} (ImageNet's 50,000 evaluation images; each method's calibration "
              "protocol; PTQ4ViT measured on deit_tiny and scaled by multiply-adds; reconstruction per iteration measured "
              "on the first block of deit_tiny, deit_small, deit_base and swin_tiny, the other models' blocks from these):",
              "", "| model | " + " | ".join(methods) + " |", "|---|---|---|---|---|---|"]
    for model in SEVEN:
        if model in costs:
            lines.append(f"| {model} | " + " | ".join(f"{costs[model][k]:.2f}" if k in costs[model] else "–" for k in methods) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ page


def replace_section(page: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- measured:{name} -->\n)(?:.*?\n)?(<!-- /measured:{name} -->)", re.S)
    if not pattern.search(page):
        raise SystemExit(f"error: docs page has no <!-- measured:{name} --> ... <!-- /measured:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "benchmarks" / "performance")
    parser.add_argument("--peer-root", type=Path, default=None, help="official code (default: $PEER_ROOT, else ../peers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and iterations, 1 thread only")
    parser.add_argument("--from-json", action="store_true", help="only rebuild the page from --work-dir's JSON")
    parser.add_argument("--gpu-dir", type=Path, default=None, help="also write the GPU sections from this gpu_check.sh folder")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        measure(args, args.work_dir)
    eval_data, recon, calib = load(args.work_dir, "eval"), load(args.work_dir, "recon"), load(args.work_dir, "calib")
    if not (eval_data and recon and calib):
        raise SystemExit(f"error: {args.work_dir} lacks eval.json, recon.json or calib.json: run without --from-json")
    recon_t2, ptq4vit = load(args.work_dir, "recon_t2"), load(args.work_dir, "calib_ptq4vit_d1")
    page = args.out.read_text()
    if not args.from_json:
        page = replace_section(page, "machine", machine())
    page = replace_section(page, "eval", eval_table(eval_data))
    compiled = load(args.work_dir, "eval_compile")
    page = replace_section(page, "eval_compile", compiled_table(compiled) if compiled else
                           "Not measured yet: `benchmarks/eval_overhead.py --compile` writes eval_compile.json.")
    page = replace_section(page, "reconstruction", recon_table(recon, recon_t2))
    page = replace_section(page, "calibration", calib_table(calib, ptq4vit))
    page = replace_section(page, "cost", cost_table(run_costs(eval_data, recon, calib, ptq4vit)))
    if args.gpu_dir is not None:
        page = replace_section(page, "gpu", gpu_section(args.gpu_dir))
        gpu_name = last_matching_line(args.gpu_dir / "env.txt", "torch") or "GPU"
        gpu_name = re.sub(r".*CUDA \S+ (.*?) timm.*", r"\1", gpu_name)
        page = replace_section(page, "gpu_cost", gpu_cost_table(gpu_run_costs(args.gpu_dir), gpu_name))
    args.out.write_text(page)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
