"""Compare our implementation of a method with an official-code oracle, tensor by tensor.

An oracle bundle (``shared/oracles``: ``<name>.npz`` plus a ``<name>.json`` sidecar) holds the FP weights the
official code used (``fp_weight/*``), its calibration, reconstruction and evaluation inputs (``inputs/calib``,
``inputs/optim`` where it reconstructs, ``inputs/eval``),
its logits (``logits/fp``, ``logits/q``) and every quantizer parameter (``qparam/<module>.<quantizer>.<attr>``).
This tool loads the same weights into a timm 1.x model, checks the FP logits first, runs our method on the same
calibration batch and reports, per quantizer, the largest relative difference of scales and zero points, then
the quantized logits' agreement (cosine, max |Δ|, top-1).

    python -m ptq_bench.compare --oracle ../peers/oracle_out/repq_deit_tiny_w4a4.npz --method repq_vit
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import timm
import torch
from torch import nn

from ptq_bench.calibration import image_calibration
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.methods.qdrop import QDrop
from ptq_bench.models import set_quantizers_enabled
from ptq_bench.quant.sulq import SulqQuantizer

#: official attribute / quantizer names → ours (RepQ-ViT quant_modules.py / quantizer.py naming; AdaLog's
#: quant_layers/*.py ``w_quantizer``/``a_quantizer``/``A_quantizer``/``B_quantizer``; ERQ's two-part weight quantizer)
_NAME_MAP = {"quantizer_A": "quantizer_a", "quantizer_B": "quantizer_b", "delta": "scale",
             "w_quantizer": "weight_quantizer", "a_quantizer": "input_quantizer",
             "A_quantizer": "quantizer_a", "B_quantizer": "quantizer_b",
             "delta_2": "scale_2", "unique_top_indices": "outlier_columns", "unique_nottop_indices": "other_columns"}
#: I&S-ViT's SULQ (its LogSqrt2Quantizer): official attribute (after :data:`_NAME_MAP`) → ours
_SULQ_NAMES = {"scale": "shift", "maxv": "log_max", "minv": "log_min"}
#: official quantizers that exist but never act, per method (left out of the comparison): the AdaLog code base's
#: patch-embedding input quantizer at qconv_a_bit = 8 (quant_layers/conv.py ``quant_input`` returns the input for
#: n_bits >= 8; APHQ-ViT and its QDrop are forks of it)
IGNORED_QPARAMS = {method: ("patch_embed.proj.a_quantizer.",) for method in ("adalog", "aphq_vit", "qdrop", "fima_q")}


@dataclass(frozen=True)
class ParamDiff:
    """Agreement of one quantizer attribute with the oracle's."""

    official: str
    ours: str
    max_abs: float
    max_rel: float


@dataclass(frozen=True)
class LogitAgreement:
    cosine: float
    max_abs: float
    top1: float

    def __str__(self) -> str:
        return f"cosine {self.cosine:.8f}  max|Δ| {self.max_abs:.3e}  top-1 agreement {self.top1:.4f}"


def our_name(official: str) -> str:
    """``blocks.0.attn.matmul2.quantizer_A.delta`` → ``blocks.0.attn.matmul2.quantizer_a.scale``."""
    return ".".join(_NAME_MAP.get(part, part) for part in official.split("."))


def relative_diff(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref|, max |ours - ref| / |ref|) elementwise; where ref = 0 the absolute difference is used."""
    diff = (ours.double() - ref.double()).abs()
    denom = ref.double().abs()
    rel = torch.where(denom > 0, diff / denom.clamp_min(1e-300), diff)
    return float(diff.max()), float(rel.max())


def logit_agreement(ours: torch.Tensor, ref: torch.Tensor) -> LogitAgreement:
    cosine = torch.nn.functional.cosine_similarity(ours.flatten().double(), ref.flatten().double(), dim=0)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).double().mean()
    return LogitAgreement(float(cosine), float((ours - ref).abs().max()), float(top1))


def load_bundle(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The oracle's arrays and its json sidecar (empty dict when there is none)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    return arrays, meta


def build_fp_model(
    arrays: dict[str, np.ndarray], model_name: str, depth: Optional[int], model_kwargs: Optional[dict[str, Any]] = None
) -> nn.Module:
    """timm model with the oracle's FP weights (``fp_weight/*``); ``depth`` keeps the first blocks, as the oracle."""
    model = timm.create_model(model_name, pretrained=False, **(model_kwargs or {}))
    if depth:
        model.blocks = model.blocks[:depth]
    state = {k[len("fp_weight/"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("fp_weight/")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def qparam_diffs(model: nn.Module, arrays: dict[str, np.ndarray], ignore: Sequence[str] = ()) -> list[ParamDiff]:
    """Every ``qparam/*`` of the oracle against the same parameter of our model (official names starting with one of
    ``ignore`` left out)."""
    diffs = []
    for key in sorted(k for k in arrays if k.startswith("qparam/")):
        official = key[len("qparam/"):]
        if official.startswith(tuple(ignore)):
            continue
        ours = our_name(official)
        module_name, attr = ours.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if isinstance(module, SulqQuantizer):
            attr = _SULQ_NAMES.get(attr, attr)
            ours = f"{module_name}.{attr}"
        value = getattr(module, attr)
        ref = torch.from_numpy(arrays[key])
        diffs.append(ParamDiff(official, ours, *relative_diff(value.detach().reshape(ref.shape), ref)))
    return diffs


def weight_diffs(model: nn.Module, arrays: dict[str, np.ndarray]) -> list[ParamDiff]:
    """The oracle's post-reparameterization state dict (``q_weight/*``) against ours (its quantizer tensors, which
    the AdaLog family keeps in the state dict, are the ``qparam/*`` comparison's)."""
    state = model.state_dict()
    diffs = []
    for key in sorted(k for k in arrays if k.startswith("q_weight/")):
        name = key[len("q_weight/"):]
        if f"qparam/{name}" in arrays:  # a quantizer's tensor in the official state dict (AdaLog): compared as a qparam
            continue
        ref = torch.from_numpy(arrays[key])
        diffs.append(ParamDiff(name, name, *relative_diff(state[name].reshape(ref.shape), ref)))
    return diffs


def _group(name: str) -> str:
    """``blocks.3.attn.qkv.input_quantizer.scale`` → ``attn.qkv.input_quantizer.scale`` (per-kind summary)."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] in ("blocks", "layers") else name


def summarize(diffs: Sequence[ParamDiff]) -> dict[str, tuple[float, float]]:
    """Per kind of quantizer attribute: the worst (max_abs, max_rel) over all blocks."""
    out: dict[str, tuple[float, float]] = {}
    for d in diffs:
        key = _group(d.official)
        old = out.get(key, (0.0, 0.0))
        out[key] = (max(old[0], d.max_abs), max(old[1], d.max_rel))
    return out


def write_fixture(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> None:
    """A small pin fixture: the oracle's quantizer parameters and logits plus how to rebuild its run (``extra``: more
    facts for its ``meta``, e.g. the method options the oracle's config was changed to)."""
    keep = {k: v for k, v in arrays.items() if k.startswith("qparam/") or k in ("logits/fp", "logits/q")}
    args = meta.get("args", {})
    info = {
        "source": f"{meta.get('peer_repo', '?')} @ {meta.get('peer_commit', '?')}, via shared/oracles",
        "seed": args.get("seed"),
        "calib_size": args.get("calib_size"),
        "eval_size": args.get("eval_size"),
        "w_bits": args.get("w_bits"),
        "a_bits": args.get("a_bits"),
        "n_qparams": sum(k.startswith("qparam/") for k in keep),
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, meta=np.array(json.dumps(info)), **keep)


def compare(
    oracle: Path,
    method: str,
    options: dict[str, Any],
    model_name: Optional[str] = None,
    verbose: bool = False,
    model_kwargs: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Run the full comparison, print it, and return the figures."""
    arrays, meta = load_bundle(oracle)
    args = meta.get("args", {})
    model_name = model_name or args.get("model", "deit_tiny_patch16_224")
    bits = BitWidth(int(args.get("w_bits", 4)), int(args.get("a_bits", 4)))
    model = build_fp_model(arrays, model_name, args.get("depth"), model_kwargs)
    calib, evalx = torch.from_numpy(arrays["inputs/calib"]), torch.from_numpy(arrays["inputs/eval"])
    print(f"oracle {oracle.name}: {model_name}, {bits.label}, {len(calib)} calibration / {len(evalx)} eval images")

    with torch.no_grad():
        fp = model(evalx)
    fp_agree = logit_agreement(fp, torch.from_numpy(arrays["logits/fp"]))
    print(f"FP logits vs oracle:        {fp_agree}")

    ours = build_method(method, bits, **options)
    if "inputs/optim" in arrays and isinstance(ours, QDrop):  # the bundle's own reconstruction set
        calibrate_and_reconstruct(ours, model, calib, torch.from_numpy(arrays["inputs/optim"]), ours.seed)
    else:
        ours.quantize(model, image_calibration(calib))
    qdiffs = qparam_diffs(model, arrays, IGNORED_QPARAMS.get(method, ()))
    wdiffs = weight_diffs(model, arrays)
    if verbose:
        for d in qdiffs:
            print(f"  {d.official:55s} -> {d.ours:55s} max|Δ| {d.max_abs:.3e}  max rel {d.max_rel:.3e}")
    print("quantizer parameters, worst over blocks (max|Δ|, max rel):")
    for key, (mabs, mrel) in summarize(qdiffs).items():
        print(f"  {key:45s} {mabs:.3e}  {mrel:.3e}")
    worst_w = max(wdiffs, key=lambda d: d.max_rel, default=None)
    if worst_w is not None:
        print(f"reparameterized weights: worst max rel {worst_w.max_rel:.3e} ({worst_w.official})")

    with torch.no_grad():
        q = model(evalx)
        set_quantizers_enabled(model, False)
        q_off = model(evalx)
        set_quantizers_enabled(model, True)
    q_agree = logit_agreement(q, torch.from_numpy(arrays["logits/q"]))
    off_agree = logit_agreement(q_off, fp)
    print(f"quantizers off vs our FP:   {off_agree}")
    print(f"quantized logits vs oracle: {q_agree}")
    return {
        "fp": fp_agree,
        "quantized": q_agree,
        "quant_off": off_agree,
        "qparams": qdiffs,
        "weights": wdiffs,
        "max_rel_scale": max((d.max_rel for d in qdiffs if d.ours.endswith(".scale")), default=0.0),
        "max_rel_zero_point": max((d.max_rel for d in qdiffs if d.ours.endswith(".zero_point")), default=0.0),
        "logits_q": q,
    }


def calibrate_and_reconstruct(method: QDrop, model: nn.Module, calib: torch.Tensor, optim: torch.Tensor, reseed: int,
                              after_prepare: Callable[[nn.Module, Optional[nn.Module]], None] | None = None) -> None:
    """A QDrop-family method (QDrop, APHQ-ViT, FIMA-Q) in the official order on separate image sets: its FP
    reference (:meth:`QDrop.fp_reference`), ``prepare_fp_`` on the reconstruction set ``optim`` (APHQ-ViT's MLP
    reconstruction), ``after_prepare(model, fp)`` if given, the calibration search on ``calib``, then the
    reconstruction on ``optim``; each generator seeded ``reseed``, as the oracles reseed the global one."""
    images = image_calibration(optim)
    fp = method.fp_reference(model)
    method.prepare_fp_(model, fp, images, torch.Generator().manual_seed(reseed))
    if after_prepare is not None:
        after_prepare(model, fp)
    method.calibrate_(model, image_calibration(calib))
    method.reconstruct(model, fp, images, torch.Generator().manual_seed(reseed))


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
    return options


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oracle", type=Path, required=True, help="oracle .npz (its .json sidecar is read too)")
    parser.add_argument("--method", required=True, help="registered method name, e.g. repq_vit")
    parser.add_argument("--model", help="timm model name (default: the oracle's)")
    parser.add_argument("--model-kwargs", type=json.loads, default=None, help="JSON kwargs for timm.create_model")
    parser.add_argument("--write-fixture", type=Path, help="also save the oracle's qparams/logits as a pin fixture")
    parser.add_argument("--option", action="append", default=[], help="method option key=value (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every quantizer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = compare(args.oracle, args.method, _parse_options(args.option), args.model, args.verbose, args.model_kwargs)
    if args.write_fixture:
        write_fixture(args.write_fixture, *load_bundle(args.oracle))
        print(f"fixture written to {args.write_fixture}")
    print(f"max rel diff: scales {result['max_rel_scale']:.3e}, zero points {result['max_rel_zero_point']:.3e}")


if __name__ == "__main__":
    main()
