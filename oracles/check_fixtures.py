#!/usr/bin/env python
"""Regenerate pin fixtures from the official code and check them bit for bit.

Each fixture in tests/fixtures/ whose json ``meta`` names an ``oracles/...`` command in its ``oracle`` field is
re-made by running that command (with the peers' interpreter, ``--out`` under ``$PEER_ROOT/oracle_out``), then
every array of the fixture (all keys but ``meta``) is compared with the new bundle's array of the same key:
identical dtype, shape and bytes. Prints one line per fixture and exits 1 if any differs or fails to run.

    PEER_ROOT=/work/peers python oracles/check_fixtures.py [fixture-stem ...]     (default: every such fixture)

Set-up of ``$PEER_ROOT`` (official code at the pinned commits, the peers' venv, timm side-installs): README.md here.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def oracle_command(fixture: Path) -> list[str] | None:
    """The ``oracles/...`` command in the fixture's meta (text before a parenthesised remark), or None."""
    with np.load(fixture) as z:
        if "meta" not in z.files:
            return None
        text = json.loads(str(z["meta"])).get("oracle", "")
    if not text.startswith("oracles/"):
        return None
    return shlex.split(text.split(" (", 1)[0])


def differing(fixture: Path, bundle: Path) -> list[str]:
    """Keys of the fixture (``meta`` aside) that the bundle lacks or holds with other dtype, shape or bytes."""
    with np.load(fixture) as want, np.load(bundle) as got:
        return [key for key in want.files if key != "meta" and (
            key not in got.files or want[key].dtype != got[key].dtype or want[key].shape != got[key].shape
            or want[key].tobytes() != got[key].tobytes())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="fixture stems (default: every fixture with an oracles/ command)")
    args = parser.parse_args()
    peer_root = Path(os.environ.get("PEER_ROOT") or REPO.parent / "peers")
    python = os.environ.get("PEER_PYTHON") or str(peer_root / "venv" / "bin" / "python")
    out_dir = peer_root / "oracle_out" / "check_fixtures"
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = args.names or sorted(p.stem for p in FIXTURES.glob("*.npz") if oracle_command(p))
    failures = 0
    for stem in stems:
        fixture = FIXTURES / f"{stem}.npz"
        command = oracle_command(fixture)
        if command is None:
            print(f"{stem}: no oracles/ command in its meta")
            failures += 1
            continue
        bundle = out_dir / f"{stem}.npz"
        script, rest = command[0], command[1:]
        split = rest.index("--") if "--" in rest else len(rest)  # flags after '--' go to the official parser
        argv = [python, str(REPO / script), *rest[:split], "--out", str(bundle), *rest[split:]]
        run = subprocess.run(argv, cwd=REPO, env={**os.environ, "PEER_ROOT": str(peer_root)},
                             capture_output=True, text=True)
        if run.returncode != 0 or not bundle.exists():
            print(f"{stem}: oracle failed (rc {run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
            failures += 1
            continue
        bad = differing(fixture, bundle)
        with np.load(fixture) as z:
            count = len(z.files) - ("meta" in z.files)
        print(f"{stem}: {count - len(bad)}/{count} arrays identical" + (f"; differ: {bad[:5]}" if bad else ""))
        failures += bool(bad)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
