"""docs/methods/<m>.md states the defaults of conf/method/<m>.yaml (the YAML is the truth): a doc that still gives
old calibration sizes or iteration counts misleads anyone sizing a run."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from conftest import REPO

DOCS = sorted((REPO / "docs" / "methods").glob("*.md"))
#: Options that size a run: each doc states the YAML's value as `key: value`.
PROTOCOL_KEYS = ("calib_size", "search_iters", "iters", "batch_size")


def numeric_options(name: str) -> dict[str, float]:
    options = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / f"{name}.yaml"))
    return {k: float(v) for k, v in options.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stated_values(text: str, key: str) -> list[float]:
    """Numbers the text gives ``key`` (`key: 6000`, key 600, `key` = 32, `key` (32)); overrides such as
    ``method.key=256`` (another protocol, e.g. COCO's) or an oracle's ``--key 4`` or ``--cfg key=64`` and a call's ``key=64``
    are not statements of the default."""
    pattern = rf"(?<![\w.-]){key}`?(?::|\s+=|\s*\(|\s)\s*(\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?)\b"
    return [float(m.replace(",", "")) for m in re.findall(pattern, text)]


@pytest.mark.parametrize("doc", DOCS, ids=[d.stem for d in DOCS])
def test_method_doc_states_the_yaml_defaults(doc):
    options = numeric_options(doc.stem)
    text = doc.read_text()
    for key, value in options.items():
        assert all(stated == value for stated in stated_values(text, key)), (key, stated_values(text, key), value)
    for key in PROTOCOL_KEYS:
        if key in options:
            assert re.search(rf"`{key}: {int(options[key])}`", text), f"{doc.name} does not state `{key}: {int(options[key])}`"
