"""Rename a non-timm checkpoint's keys to timm's, once, and save it as .safetensors for ``model.checkpoint=``.

    python scripts/convert_checkpoint_example.py theirs.pth converted.safetensors
    python scripts/convert_checkpoint_example.py theirs.pth out.safetensors --rename '^backbone\\.' '' --drop '^aux\\.'

The input is read like ``model.checkpoint`` (tensors only, ``torch.load(weights_only=True)``; a state dict nested
under ``model``/``state_dict`` is unwrapped). Each key goes through every ``(regex, replacement)`` of the mapping in
order (``re.sub``); keys matching a ``--drop`` regex are left out. ``RENAMES`` is the mapping for an example
codebase's ViT naming (``encoder.layers.N.attention.qkv`` → timm ``blocks.N.attn.qkv``); edit it, or pass
``--rename`` pairs, for yours. The harness's strict load then names any key that still does not fit.
"""

from __future__ import annotations

import argparse
import re

import torch
from safetensors.torch import save_file

from ptq_bench.datasets import expand_path
from ptq_bench.errors import PTQBenchError
from ptq_bench.models.build import read_checkpoint

#: (regex, replacement) applied to every key in order: an example codebase's ViT names → timm VisionTransformer's.
RENAMES = [
    (r"^patch_embedding\.conv\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^position_embedding$", "pos_embed"),
    (r"^encoder\.layers\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.attention\.(qkv|proj)\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.linear(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"^encoder\.norm\.", "norm."),
    (r"^classifier\.", "head."),
]


StateDict = dict[str, torch.Tensor]


def rename_keys(state: StateDict, renames: list[tuple[str, str]], drop: list[str]) -> StateDict:
    """The state dict under its new key names; two keys renamed to one name are an error."""
    renamed: StateDict = {}
    for key, value in state.items():
        if any(re.search(pattern, key) for pattern in drop):
            continue
        new_key = key
        for pattern, replacement in renames:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key in renamed:
            raise SystemExit(f"error: two keys become '{new_key}' (the second is '{key}'): fix the mapping")
        renamed[new_key] = value.detach().contiguous().clone()  # safetensors stores no shared or strided storage
    return renamed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the checkpoint to convert (.pth/.pt/.bin/.safetensors)")
    parser.add_argument("target", help="where to write the timm-keyed .safetensors")
    parser.add_argument("--rename", nargs=2, action="append", metavar=("REGEX", "REPLACEMENT"),
                        help="a (regex, replacement) pair, repeatable; replaces RENAMES")
    parser.add_argument("--drop", action="append", default=[], metavar="REGEX", help="leave out keys matching REGEX")
    args = parser.parse_args()
    try:
        source, _ = read_checkpoint(expand_path(args.source))
    except PTQBenchError as error:
        raise SystemExit(f"error: {error}") from None
    state = rename_keys(source, args.rename or RENAMES, args.drop)
    target = expand_path(args.target)
    save_file(state, str(target))
    print(f"wrote {len(state)} tensors to {target}; first keys: {', '.join(list(state)[:3])}")


if __name__ == "__main__":
    main()
