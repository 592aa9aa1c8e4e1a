"""The tests' tiny ViT and tiny Swin for the oracle wrappers: their FP weights, and the same architecture built in
whatever timm the peer interpreter imports (timm 0.9.2 for the AdaLog family).

Two interpreters meet here. The weights are made by the repository's own ``.venv`` (timm 1.x) from
``tests/pins.py`` (``tiny_vit()``, ``tiny_swin()``), saved as a ``.pt`` state dict, and the peer venv loads them with
the oracle's ``--init-weights``. The key layout of both tiny models is the same in timm 0.9.2 and 1.x (0.9.2 only
adds the non-learned ``relative_position_index`` and ``attn_mask`` buffers, which ``load_state_dict(strict=False)``
leaves as built), so no key mapping is needed. The architectures (``TINY_VIT``, ``TINY_SWIN``) and the image shape
are read from tests/pins.py's source, not repeated here.

Command line (run with the repository's .venv/bin/python)::

    python oracles/_tiny_models.py --model vit|swin [--weights seeded|timm] --out FILE.pt
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "tests" / "pins.py"
#: the interpreter that has the repository's timm 1.x and tests/pins.py's imports
MAIN_PYTHON = os.environ.get("MAIN_PYTHON", str(REPO / ".venv" / "bin" / "python"))
#: the weights each model takes unless --weights says otherwise: tiny_vit() (seeded_state_dict) and tiny_swin()
#: (timm's init after torch.manual_seed(0))
DEFAULT_WEIGHTS = {"vit": "seeded", "swin": "timm"}


def _pins_constant(name: str):
    """A module-level constant of tests/pins.py (a ``dict(...)`` call or a literal), without importing it."""
    for node in ast.parse(PINS.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict":
                return {k.arg: ast.literal_eval(k.value) for k in value.keywords}
            return ast.literal_eval(value)
    raise KeyError(f"{name} not found in {PINS}")


TINY_VIT = _pins_constant("TINY_VIT")
TINY_SWIN = _pins_constant("TINY_SWIN")
IMAGE_SHAPE = tuple(_pins_constant("IMAGE_SHAPE"))


def build(model: str):
    """The tiny model in the imported timm (randomly initialised; the oracle loads the weights afterwards)."""
    if model == "vit":
        from timm.models.vision_transformer import VisionTransformer
        return VisionTransformer(**TINY_VIT)
    if model == "swin":
        from timm.models.swin_transformer import SwinTransformer
        return SwinTransformer(**TINY_SWIN)
    raise ValueError(model)


def dump_weights(model: str, weights: str, out: Path) -> Path:
    """Save tests/pins.py's weights (run under the repository's interpreter)."""
    import torch
    sys.path.insert(0, str(PINS.parent))
    import pins
    if model == "vit":
        if weights != "seeded":
            raise SystemExit("the tiny ViT's pins use seeded_state_dict weights only")
        net = pins.tiny_vit()
    else:
        net = pins.tiny_swin(seeded=weights == "seeded")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    return out


def weights_file(model: str, weights: str, directory: Path) -> Path:
    """tests/pins.py's weights as a .pt in ``directory``, made by the repository's interpreter (from any other)."""
    out = Path(directory) / f"tiny_{model}_{weights}.pt"
    subprocess.run([MAIN_PYTHON, str(Path(__file__).resolve()), "--model", model, "--weights", weights,
                    "--out", str(out)], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("vit", "swin"), required=True)
    ap.add_argument("--weights", choices=("seeded", "timm"), default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    print(dump_weights(a.model, a.weights or DEFAULT_WEIGHTS[a.model], a.out))


if __name__ == "__main__":
    main()
