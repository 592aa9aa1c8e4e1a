#!/usr/bin/env bash
# Install the detection extra ([det]: mmengine 0.10.7, mmdet 3.3.0, pycocotools) and mmcv 2.1.0 with its compiled
# ops (RoIAlign, NMS) into a venv, for CPU machines where no prebuilt mmcv matches the installed torch.
#
# mmcv 2.x is an sdist only on PyPI. Its setup.py passes -std=c++17, but torch >= 2.14's headers need C++20, so the
# sdist is downloaded, that one flag is patched and the wheel is built once without build isolation (~25 min on
# 2 cores). The wheel is kept in $PTQ_BENCH_WHEELS/torch-<version>/ (default ~/.cache/ptq-bench-wheels), outside
# the clone and keyed by the torch version (mmcv's ops are compiled against torch's ABI); later runs install it in
# seconds. Idempotent: an mmcv 2.1.0 whose ops import is left alone.
#
# Usage: scripts/install_det.sh [path/to/venv/bin/python]     (default: .venv/bin/python)
# GPU users: install a prebuilt mmcv for their CUDA/torch instead (see README.md), then `pip install -e ".[det]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
MMCV_VERSION=2.1.0
PIP=("$PY" -m pip --quiet)

TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
WHEEL_DIR=${PTQ_BENCH_WHEELS:-$HOME/.cache/ptq-bench-wheels}/torch-$TORCH_VERSION
mkdir -p "$WHEEL_DIR"

have_mmcv_ops() {
  "$PY" - "$MMCV_VERSION" <<'EOF' 2>/dev/null
import sys
import mmcv
from mmcv.ops import nms  # noqa: F401  (imports mmcv._ext, the compiled ops)
sys.exit(0 if mmcv.__version__ == sys.argv[1] else 1)
EOF
}

# Build requirements of mmcv's setup.py (pkg_resources needs setuptools < 81; torch needs >= 77.0.3).
"${PIP[@]}" install "setuptools>=77.0.3,<81" wheel ninja

MMCV_WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if have_mmcv_ops; then
  echo "install_det: mmcv $MMCV_VERSION with compiled ops already installed"
  MMCV_WHEEL=""
elif [[ -z "$MMCV_WHEEL" ]]; then
  echo "install_det: building mmcv $MMCV_VERSION for torch $TORCH_VERSION (once; ~25 min on 2 cores) into $WHEEL_DIR"
  SRC=$(mktemp -d)
  trap 'rm -rf "$SRC"' EXIT
  "${PIP[@]}" download --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$SRC"
  tar -xzf "$SRC"/mmcv-"$MMCV_VERSION".tar.gz -C "$SRC"
  grep -q -- "-std=c++17" "$SRC/mmcv-$MMCV_VERSION/setup.py" || { echo "install_det: mmcv setup.py has no -std=c++17 flag to patch" >&2; exit 1; }
  sed -i 's/-std=c++17/-std=c++20/g' "$SRC/mmcv-$MMCV_VERSION/setup.py"
  start=$(date +%s)
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" "$SRC/mmcv-$MMCV_VERSION"
  echo "install_det: mmcv wheel built in $(( $(date +%s) - start )) s"
  MMCV_WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)
else
  echo "install_det: using cached $MMCV_WHEEL"
fi

# One resolver pass: the extra (which does not list mmcv, so pip never tries the stock sdist) and the built wheel.
"${PIP[@]}" install -e ".[det]" ${MMCV_WHEEL:+"$MMCV_WHEEL"}
have_mmcv_ops || { echo "install_det: mmcv $MMCV_VERSION ops do not import after install" >&2; exit 1; }
echo "install_det: done ($("$PY" -c 'import mmcv, mmdet, mmengine; print(f"mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, mmdet {mmdet.__version__}")'))"
