#!/usr/bin/env python
"""RepQ-ViT's official pipeline (zkkli/RepQ-ViT @ a160561, timm 0.4.12) on the tests' tiny ViT: the run behind
tests/fixtures/repq_vit_tiny_w4a4.npz (tests/test_repq_vit.py).

Drives the organizers' base oracle ``../shared/oracles/repqvit_oracle.py`` (its ``main()``: the official
``classification/test_quant.py::main()`` with I/O patches, see its docstring) and adds two run-time patches; no
official code is copied here:
  * ``timm.create_model`` (called by classification/utils/build_model.py, whose attention patching still runs)
    -> tests/pins.py's tiny ViT in timm 0.4.12 with tests/pins.py's weights (oracles/_repq_lineage.py);
  * ``_oracle_common.synthetic_batch`` -> images of tests/pins.py's IMAGE_SHAPE (3x32x32), same seeds.
Flags after the wrapper's own go to the base oracle (``--seed --w-bits --a-bits --calib-size --eval-size``).

  PEER_ROOT=/work/peers /work/peers/venv/bin/python oracles/repqvit_tiny.py --calib-size 8 --eval-size 4 \\
      --out /work/peers/oracle_out/repq_vit_tiny_w4a4.npz --compare tests/fixtures/repq_vit_tiny_w4a4.npz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repq_lineage as L  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="bundle .npz (+ .json sidecar), outside the repository")
    ap.add_argument("--compare", type=Path, default=None, help="a fixture to check bit for bit against the bundle")
    ap.add_argument("--threads", type=int, default=1)
    a, base_argv = ap.parse_known_args()
    C, _ = L.setup("RepQ-ViT", "classification", threads=a.threads)
    import timm
    import repqvit_oracle as base  # the organizers' oracle, from ../shared/oracles (on sys.path after setup)

    timm.create_model = L.tiny_create_model("vit", L.weights_file("vit", a.out.parent))
    batch = C.synthetic_batch
    C.synthetic_batch = lambda seed, n, shape=L.IMAGE_SHAPE: batch(seed, n, shape)
    sys.argv = [base.__file__, *base_argv, "--threads", str(a.threads), "--out", str(a.out)]
    base.main()
    if a.compare and not L.compare_fixture(a.out, a.compare):
        sys.exit(1)


if __name__ == "__main__":
    main()
