"""Label maps for image-folder classification: which output of the model's head a class folder's images belong to.

A torchvision ``ImageFolder`` numbers the class folders present in one split (0..k-1 in sorted order), while a
model's head indexes its own label set. The two agree only when a split holds exactly the head's classes; a val
subset (725 of the 1000 ImageNet classes), train and val with different class sets, or folders named by class words
instead of wnids silently give wrong labels. So every image folder is read through a :class:`LabelMap`, chosen by
``data.labels`` (``auto | imagenet-1k | folder``) and ``data.class_map``:

- ``imagenet-1k``: folders named by WordNet id (``n01440764``) map to timm's ImageNet-1k class index
  (``timm.data.ImageNetInfo``: timm's own list of the 1000 wnids, in the order its ImageNet-1k heads use);
- ``data.class_map=<file>``: the dataset's own map, one class folder name per line in the head's index order;
- ``folder``: the val split's class folders in sorted order (what ``ImageFolder`` does), accepted only when their
  count equals the head's output size;
- ``auto`` (default): ``data.class_map`` when given, ImageNet-1k when the head has timm's ImageNet-1k size (1000
  outputs, ``timm.data.infer_imagenet_subset``), the folder order otherwise.

Every folder class of an opened split must be in the map; a subset of the map's classes is fine (the record's
metrics say how many classes and images were evaluated). The map's identity ("imagenet-1k wnids", the class map's
sha256, or "folder order") is recorded in ``data.label_map`` and, unless it is the folder order, enters the run key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ptq_bench.errors import ConfigError, DataError
from ptq_bench.paths import expand_path

#: ``data.labels`` values (code default = conf/data/imagenet.yaml's).
LABEL_SOURCES = ("auto", "imagenet-1k", "folder")
DEFAULT_LABELS = "auto"
#: The identity of the folder-order map: not keyed (runs recorded before label maps existed keep their run keys).
FOLDER_ORDER = "folder order"
IMAGENET_1K = "imagenet-1k wnids"
#: MNIST's own label set (the shipped IDX labels 0..9).
MNIST_CLASSES = 10


@dataclass(frozen=True)
class LabelMap:
    """Class names in the head's index order; ``identity`` names the map in the record and run key, ``source``
    names it in messages."""

    names: tuple[str, ...]
    identity: str
    source: str
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {name: i for i, name in enumerate(self.names)})

    @property
    def keyed(self) -> bool:
        """Whether the map enters the run key (every map but the folder order)."""
        return self.identity != FOLDER_ORDER

    def class_to_idx(self, classes: Sequence[str], where: str) -> dict[str, int]:
        """``{folder: head index}`` for the class folders ``classes`` of ``where``; one line naming the first folder
        not in the map."""
        unknown = [name for name in classes if name not in self.index]
        if unknown:
            more = f" (and {len(unknown) - 1} more of its {len(classes)})" if len(unknown) > 1 else ""
            hint = ("; ImageNet-1k class folders are named by wnid (n01440764): for other names give "
                    "data.class_map=<file> (one class folder name per line, in the head's order)") if self.identity == IMAGENET_1K else ""
            raise DataError(f"class folder '{unknown[0]}' of {where}{more} is not in the label map ({self.source}){hint}")
        return {name: self.index[name] for name in classes}


def imagenet_1k() -> LabelMap:
    """timm's ImageNet-1k wnids in its class-index order (``timm/data/_info/imagenet_synsets.txt``)."""
    from timm.data import ImageNetInfo

    return LabelMap(tuple(ImageNetInfo("imagenet-1k").label_names()), IMAGENET_1K, "timm's ImageNet-1k wnids")


def read_class_map(path: str) -> LabelMap:
    """``data.class_map``: one class folder name per line, line k naming output k; trailing blank lines ignored."""
    file = expand_path(path)
    if not file.is_file():
        raise DataError(f"data.class_map={path!r}: file not found")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"data.class_map={path!r}: unreadable ({type(error).__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise DataError(f"data.class_map={path!r}: the file lists no classes")
    for number, name in enumerate(names, 1):
        if not name:
            raise DataError(f"data.class_map={path!r}: line {number} is empty (line k names the head's output k-1)")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, 1):
        if name in seen:
            raise DataError(f"data.class_map={path!r}: '{name}' is on lines {seen[name]} and {number}")
        seen[name] = number
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return LabelMap(tuple(names), f"class_map sha256:{digest}", f"data.class_map={path}")


def folder_order(classes: Sequence[str], outputs: int | None, where: str) -> LabelMap:
    """The class folders of ``where`` in sorted order as the head's outputs (``ImageFolder``'s numbering): only when
    there are exactly as many as the head has outputs."""
    count = len(classes)
    if outputs is not None and count != outputs:
        problem = "more classes than the head has outputs" if count > outputs else "fewer classes than the head has outputs"
        raise DataError(
            f"{where} holds {count} class folders but the model's head has {outputs} outputs ({problem}): folder k "
            "is output k only when the counts match; give data.class_map=<file> (one class folder name per line, in "
            "the head's order), or data.labels=imagenet-1k for ImageNet-1k wnid folders")
    return LabelMap(tuple(sorted(classes)), FOLDER_ORDER, f"the class folders of {where}")


def choose(labels: str, class_map: str | None, outputs: int | None) -> LabelMap | None:
    """The label map that ``data.labels``/``data.class_map`` name for a head of ``outputs`` outputs; None for the
    folder order (built from the val split's folders by :func:`folder_order`)."""
    if class_map:
        if labels != DEFAULT_LABELS:
            raise ConfigError(f"data.class_map is set and data.labels={labels}: the class map is the label map; leave data.labels=auto")
        chosen = read_class_map(class_map)
    elif labels == "imagenet-1k" or (labels == "auto" and outputs is not None and is_imagenet_1k_head(outputs)):
        chosen = imagenet_1k()
    elif labels in ("auto", "folder"):
        return None
    else:
        raise ConfigError(f"data.labels={labels!r}: must be one of {', '.join(LABEL_SOURCES)}")
    if outputs is not None and len(chosen.names) != outputs:
        raise ConfigError(f"the label set does not fit the model: {chosen.source} has {len(chosen.names)} classes but "
                          f"the model's head has {outputs} outputs")
    return chosen


def is_imagenet_1k_head(outputs: int) -> bool:
    """timm's own rule for a classifier's ImageNet label set (``infer_imagenet_subset``): 1000 outputs."""
    from timm.data import infer_imagenet_subset

    return infer_imagenet_subset({"num_classes": outputs}) == "imagenet-1k"


def head_outputs(model: nn.Module, input_size: Sequence[int]) -> int:
    """The number of outputs of the model's head: ``model.num_classes`` (timm and torchvision classifiers), else the
    width of the logits of one forward of a zero image of ``input_size`` (C, H, W)."""
    outputs = getattr(model, "num_classes", None)
    if not (isinstance(outputs, int) and not isinstance(outputs, bool)):
        try:
            with torch.no_grad():
                logits = model(torch.zeros(1, *input_size))
        except Exception as error:  # a model that cannot run on its own input size fails the same way later
            raise ConfigError(f"cannot tell how many classes the model predicts: it has no num_classes and one "
                              f"{tuple(input_size)} input failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ConfigError("the model's output is not a (batch, classes) tensor of logits: it is not a classifier")
        outputs = int(logits.shape[1])
    if outputs < 1:
        raise ConfigError(f"the model has no classifier head (num_classes={outputs}): classification needs one output per class")
    return outputs
