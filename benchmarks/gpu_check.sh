#!/usr/bin/env bash
# The GPU check of issue 11 (item 3), for a session that has a CUDA machine: a few minutes on one GPU.
#
#   benchmarks/gpu_check.sh            # GPU tests, the CLI on cuda, the benchmarks on cuda (about 5-8 minutes)
#   benchmarks/gpu_check.sh --full     # the whole test suite instead of its GPU-relevant part (longer)
#
# Everything goes to $OUT (default outputs/gpu_check; ignored by git): pytest.txt, the CLI's records, and JSON/text of
# each benchmark. Nothing here was run on a GPU when it was written (no GPU was available): the first run is the
# first GPU measurement. Needs the install of README.md with a CUDA build of torch (python -c "import torch;
# print(torch.cuda.is_available())" prints True); PYTHON overrides the interpreter (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
status=0
step() { echo; echo "== $*"; }
run() {  # run a command, its output also to $OUT/<log>; keep going on failure, remember it
    local log=$1; shift
    "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "FAILED (exit $rc): $*"; status=1; }
}

step "environment"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 && head -15 "$OUT/nvidia-smi.txt"
$PY -c "import torch, timm; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'timm', timm.__version__)" \
    | tee "$OUT/env.txt" || { echo "no usable CUDA device: stop"; exit 1; }

step "tests (tests/test_cuda.py runs every method on cuda against the CPU; the others cover the code a GPU changes)"
if [ "${1:-}" = "--full" ]; then
    run pytest.txt $PY -m pytest -q -p no:cacheprovider
else
    run pytest.txt $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fast_ste.py tests/test_fast_fakequant.py \
        tests/test_uniform_quantizer.py tests/test_prepare.py tests/test_dopq_vit.py tests/test_aiqvit.py
fi

step "the CLI on cuda: the shipped MNIST model, FP and four methods at W4A4 (small reconstruction budgets)"
run cli_fp_minmax_repq.txt $PY run.py -m device=cuda model=mnist_vit bits=w4a4 method=fp,minmax,repq_vit logger=none \
    results_dir="$OUT/runs" hydra.sweep.dir="$OUT/sweep"
run cli_dopq.txt $PY run.py -m device=cuda model=mnist_vit bits=w4a4 method=dopq_vit method.iters=50 method.calib_size=256 \
    logger=none results_dir="$OUT/runs" hydra.sweep.dir="$OUT/sweep_dopq"
run cli_aiqvit.txt $PY run.py -m device=cuda model=mnist_vit bits=w4a4 method=aiqvit method.search_iters=20 method.iters=50 \
    method.calib_size=256 logger=none results_dir="$OUT/runs" hydra.sweep.dir="$OUT/sweep_aiqvit"
run report.txt $PY -m ptq_bench.report --runs "$OUT/runs" --out "$OUT/tables"

step "eval: FP (fused and explicit attention) and fake-quant images/s at 224², peak memory, deit_tiny ... swin_base"
run eval.txt $PY benchmarks/eval_overhead.py --device cuda --threads 4 --repeats 20 --batch-size 64 \
    --models deit_tiny deit_small deit_base vit_small vit_base swin_tiny swin_small swin_base --methods minmax repq_vit \
    --json "$OUT/eval.json"

step "block reconstruction iterations/s on cuda (DopQ-ViT, AIQViT search and reconstruction; deit_tiny and MNIST)"
run recon.txt $PY benchmarks/reconstruction_speed.py --device cuda --iters 60 --warmup 10 --json "$OUT/recon.json"

step "calibration seconds on cuda (RepQ-ViT and PTQ4ViT, 32 images as in the papers)"
run calib_repq.txt $PY benchmarks/calibration_speed.py --device cuda --official skip --models deit_tiny deit_small vit_base swin_tiny \
    --json "$OUT/calib_repq.json"
run calib_ptq4vit.txt $PY benchmarks/calibration_speed.py --device cuda --official skip --method ptq4vit --models deit_tiny \
    --json "$OUT/calib_ptq4vit.json"

step "fake-quant kernels on cuda"
run kernels.txt $PY benchmarks/fakequant_kernels.py --device cuda --threads 1 --repeats 50

echo
[ $status -eq 0 ] && echo "gpu_check: all steps passed; results in $OUT" || echo "gpu_check: some steps FAILED (see above); results in $OUT"
exit $status
