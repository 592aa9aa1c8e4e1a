#!/usr/bin/env bash
# The GPU check of issue 11 (item 3), for a session that has a CUDA machine: about ten minutes on one GPU, in parts
# that can run as separate calls (each step has its own time limit, so one slow step cannot eat the rest).
#
#   benchmarks/gpu_check.sh                 # every part
#   benchmarks/gpu_check.sh tests cli calib # some: tests (the whole suite, pytest-xdist when installed), cli (run.py
#                                           # on cuda), calib, eval, compile (compiled eval), recon, kernels
#
# Each part's time limit is LIMIT_<part> seconds (defaults below); TESTS names test files instead of the whole suite.
# Results go to $GPU_CHECK_DIR (default outputs/gpu_check; ignored by git): env.txt, pytest.txt, each benchmark's
# text and JSON, the CLI's records and report. `python benchmarks/performance_report.py --gpu-dir <that folder>
# --from-json` then writes docs/performance.md's GPU section from them. Needs the install of README.md with a CUDA
# build of torch; PYTHON overrides the interpreter (default .venv/bin/python, else python3). PEER_ROOT, when it holds
# IaS-ViT and timm-0.4.12 (../shared/oracles/README.md), adds the official I&S-ViT loop beside our reconstruction.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
DIR=${GPU_CHECK_DIR:-outputs/gpu_check}
PARTS=" ${*:-tests cli calib eval compile recon kernels} "
want() { [[ $PARTS == *" $1 "* ]]; }
mkdir -p "$DIR"
status=0
export PYTHONUNBUFFERED=1
step() { echo; echo "== $(date +%T) $*"; }
run() {  # run LOG SECONDS CMD...: output also to $DIR/LOG; a step that fails or runs out of time is reported, not fatal
    local log=$1 limit=$2; shift 2
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DIR/$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "TIMED OUT after ${limit}s: $*" | tee -a "$DIR/$log"; status=1
    elif [ "$rc" -ne 0 ]; then echo "FAILED (exit $rc): $*" | tee -a "$DIR/$log"; status=1; fi
}

step "environment"
nvidia-smi > "$DIR/nvidia-smi.txt" 2>&1 && head -12 "$DIR/nvidia-smi.txt"
$PY -c "import torch, timm, platform; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('python', platform.python_version(), 'torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'timm', timm.__version__)" \
    | tee "$DIR/env.txt" || { echo "no usable CUDA device: stop"; exit 1; }

if want tests; then
    step "the test suite (device=auto: the CLI tests run on cuda; tests/test_cuda.py compares every method on cuda with the CPU)"
    workers=()
    $PY -c "import xdist" 2>/dev/null && workers=(-n "$(( $(nproc) > 14 ? 14 : $(nproc) ))")
    run pytest.txt "${LIMIT_tests:-270}" $PY -m pytest -p no:cacheprovider -rfEs "${workers[@]}" ${TESTS:-}
fi

if want eval; then
    step "eval: FP (fused and explicit attention) and fake-quant images/s at 224², peak memory, deit_tiny ... swin_base"
    run eval.txt "${LIMIT_eval:-170}" $PY benchmarks/eval_overhead.py --device cuda --threads 4 --repeats 8 --warmup 2 \
        --batch-size 64 --models deit_tiny deit_small deit_base vit_small vit_base swin_tiny swin_small swin_base \
        --methods minmax repq_vit --json "$DIR/eval.json"
fi

if want compile; then
    step "compiled eval (eval_compile=true: torch.compile of the FP and the quantized model) on deit_small"
    run eval_compile.txt "${LIMIT_compile:-150}" $PY benchmarks/eval_overhead.py --device cuda --threads 4 --repeats 8 \
        --warmup 2 --batch-size 64 --models deit_small --methods minmax repq_vit --compile --json "$DIR/eval_compile.json"
fi

if want recon; then
    step "block reconstruction iterations/s on cuda (DopQ-ViT, AIQViT search and reconstruction; eager and compiled), official I&S-ViT beside"
    official=()
    [ -n "${PEER_ROOT:-}" ] && [ -d "$PEER_ROOT/IaS-ViT" ] && official=(--official "$PEER_ROOT" --official-python "$PY")
    run recon.txt "${LIMIT_recon:-240}" $PY benchmarks/reconstruction_speed.py --device cuda --compile --iters 30 --warmup 8 \
        --models deit_tiny deit_small deit_base swin_tiny "${official[@]}" --json "$DIR/recon.json"
fi

if want calib; then
    step "calibration seconds on cuda at the papers' 32 images: RepQ-ViT on every model, PTQ4ViT on deit_tiny"
    run calib_repq.txt "${LIMIT_calib:-90}" $PY benchmarks/calibration_speed.py --device cuda --official skip \
        --models deit_tiny deit_small deit_base vit_small vit_base swin_tiny swin_small swin_base --json "$DIR/calib.json"
    run calib_ptq4vit.txt "${LIMIT_ptq4vit:-120}" $PY benchmarks/calibration_speed.py --device cuda --official skip --method ptq4vit \
        --models deit_tiny --json "$DIR/calib_ptq4vit.json"
fi

if want cli; then
    step "the CLI on cuda: the shipped MNIST model, FP and four methods at W4A4 (small reconstruction budgets)"
    run cli.txt "${LIMIT_cli:-100}" bash -c "$PY run.py -m device=cuda model=mnist_vit bits=w4a4 method=fp,minmax,repq_vit logger=none \
        results_dir=$DIR/runs hydra.sweep.dir=$DIR/sweep && \
      $PY run.py device=cuda model=mnist_vit bits=w4a4 method=dopq_vit method.iters=50 logger=none \
        results_dir=$DIR/runs hydra.run.dir=$DIR/run_dopq && \
      $PY run.py device=cuda model=mnist_vit bits=w4a4 method=aiqvit method.search_iters=20 method.iters=50 logger=none \
        results_dir=$DIR/runs hydra.run.dir=$DIR/run_aiqvit && \
      $PY -m ptq_bench.report --runs $DIR/runs --out $DIR/tables"
fi

if want kernels; then
    step "fake-quant kernels on cuda"
    run kernels.txt "${LIMIT_kernels:-40}" $PY benchmarks/fakequant_kernels.py --device cuda --threads 1 --repeats 50
fi

echo
[ $status -eq 0 ] && echo "gpu_check$PARTS: all steps passed; results in $DIR" || echo "gpu_check$PARTS: some steps FAILED (see above); results in $DIR"
exit $status
