"""Image-folder labels come from the model's label set (issue 18): a val subset of ImageNet wnid classes gets timm's
ImageNet-1k indices, a dataset's own map (data.class_map) its indices, and the folder order is kept only when the
folders match the head's size; anything else is one line before any work. Calibration does not depend on labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from timm.data import ImageNetInfo
from torch import nn

from conftest import REPO, WNIDS, make_image_folder, run_cli
from ptq_bench.datasets import image_folder
from ptq_bench.errors import ConfigError, DataError
from ptq_bench.labels import FOLDER_ORDER, IMAGENET_1K, imagenet_1k, read_class_map
from ptq_bench.results.store import run_key
from tasks import TASKS

TIMM_WNIDS = list(ImageNetInfo("imagenet-1k").label_names())
#: A val subset far from the start of the list: folder rank (0, 1, 2) and ImageNet index differ for each.
SUBSET = (TIMM_WNIDS[7], TIMM_WNIDS[388], TIMM_WNIDS[999])
#: A 3-class custom model (ptq_bench.custom_models.example_vit, small): labels from the folder order or a class map.
CUSTOM = ["model=custom_vit", "+model.builder.img_size=32", "+model.builder.patch_size=16", "+model.builder.depth=1",
          "+model.builder.embed_dim=24", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "data.crop_pct=1.0"]
SMALL = [*CUSTOM, "+model.builder.num_classes=3"]
QUIET = ["logger=none", "task.progress=false", "data.workers=0"]


def config(root: Path, *overrides: str) -> DictConfig:
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO), replace=True)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"data.root={root}", *QUIET, *overrides])


def opened(root: Path, *overrides: str, calib_size: int = 0):
    """The classification task after build_model and check_data (what the harness does before any work)."""
    task = TASKS.get("classification")(config(root, *overrides), False)
    task.validate()
    task.build_model()
    task.check_data(calib_size)
    return task


def coloured_folder(root: Path, split_classes: dict[str, tuple[str, ...]], per_class: int = 2) -> Path:
    """``root/<split>/<class>/img_i.png``, every image of class k one flat grey level (its class's), so a model can
    read the class from the pixels."""
    for split, classes in split_classes.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(np.full((32, 32, 3), 40 + 60 * k, dtype=np.uint8)).save(folder / f"img_{i}.png")
    return root


class GreyOracle(nn.Module):
    """A 1000-output 'classifier' that knows which grey level is which ImageNet class: it scores only the index that
    the image's mean level stands for. Top-1 is 100 % exactly when the labels are the head's indices."""

    def __init__(self, levels: list[float], indices: list[int]) -> None:
        super().__init__()
        self.levels, self.indices = torch.tensor(levels), torch.tensor(indices)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        nearest = (images.mean(dim=(1, 2, 3))[:, None] - self.levels[None]).abs().argmin(dim=1)
        logits = torch.zeros(len(images), 1000)
        logits[torch.arange(len(images)), self.indices[nearest]] = 1.0
        return logits


# ----------------------------------------------------------------------------------------- ImageNet-1k wnids


def test_the_imagenet_map_is_timms_own_list() -> None:
    label_map = imagenet_1k()
    assert list(label_map.names) == TIMM_WNIDS and len(label_map.names) == 1000 and label_map.identity == IMAGENET_1K
    assert label_map.index[TIMM_WNIDS[388]] == 388


def test_a_val_subset_of_wnid_classes_gets_the_imagenet_indices(tmp_path) -> None:
    """Train and val hold different class sets; val's three classes keep their ImageNet indices, not 0, 1, 2."""
    root = make_image_folder(tmp_path, classes=3, per_class=2, size=16, names=SUBSET)
    for folder in (root / "train").iterdir():  # train: another subset (2 of val's classes and one more)
        if folder.name == SUBSET[0]:
            folder.rename(root / "train" / TIMM_WNIDS[500])
    task = opened(root, "model=deit_tiny", "data=imagenet", calib_size=2)
    val = task.val
    assert val.classes == sorted(SUBSET)
    assert [target for _, target in val.samples] == [TIMM_WNIDS.index(Path(path).parent.name) for path, _ in val.samples]
    assert sorted(set(val.targets)) == [7, 388, 999]
    assert task.cfg.data.label_map == IMAGENET_1K and task.identity()["data"]["labels"] == IMAGENET_1K


def test_evaluation_scores_the_imagenet_index(tmp_path) -> None:
    """A model that predicts the right ImageNet class gets 100 % top-1 on a 3-class val subset (the folder order
    would have given 0 %); the metrics say how many classes and images were evaluated."""
    classes = (TIMM_WNIDS[7], TIMM_WNIDS[388], TIMM_WNIDS[999])
    root = coloured_folder(tmp_path, {"train": classes, "val": classes})
    task = opened(root, "model=deit_tiny", "data=imagenet", "data.img_size=32", "data.crop_pct=1.0",
                  "data.mean=[0,0,0]", "data.std=[1,1,1]")
    levels = [(40 + 60 * k) / 255 for k in range(3)]
    metrics = task.evaluate(GreyOracle(levels, [7, 388, 999]), torch.device("cpu"), "oracle")
    assert metrics["top1"] == 100.0 and metrics["num_classes"] == 3 and metrics["num_images"] == 6
    folder_rank = task.evaluate(GreyOracle(levels, [0, 1, 2]), torch.device("cpu"), "folder rank")
    assert folder_rank["top1"] == 0.0


def test_a_class_subset_run_is_labelled_apart_from_the_full_split() -> None:
    """A record of a 3-class val subset of an ImageNet head gets its own table label, never the paper's cell (the
    map alone is the same as the full val's); a full split, and a subset already labelled by image count, do not."""
    from ptq_bench.results.report import protocol_label

    def record(classes: int, max_eval_images: int | None = None) -> dict:
        return {"metrics": {"top1": 50.0, "num_classes": classes}, "model": {"head_outputs": 1000},
                "config": {"data": {"max_eval_images": max_eval_images}}}

    assert protocol_label(record(3)) == "eval 3 of 1000 classes"
    assert protocol_label(record(1000)) == "" and protocol_label(record(900, 2000)) == "eval 2000 imgs"


def test_calibration_is_unaffected_by_the_labels(tmp_path) -> None:
    """The same images are drawn with the folder order and with a class map that reverses it (labels unused)."""
    root = make_image_folder(tmp_path / "data", classes=3, per_class=3, size=16)
    reversed_map = tmp_path / "reversed.txt"
    reversed_map.write_text("class_2\nclass_1\nclass_0\n")
    folder = opened(root, *SMALL, "data=folder", calib_size=4)
    mapped = opened(root, *SMALL, "data=folder", f"data.class_map={reversed_map}", calib_size=4)
    assert folder.val.targets != mapped.val.targets and [2 - t for t in folder.val.targets] == mapped.val.targets
    a = folder.calibration(4, 0, torch.device("cpu")).identity
    b = mapped.calibration(4, 0, torch.device("cpu")).identity
    assert a == b and a["num_images"] == 4


# ----------------------------------------------------------------------------------------- refusals


def test_a_class_word_folder_is_refused_for_an_imagenet_model(tmp_path) -> None:
    root = make_image_folder(tmp_path, classes=2, per_class=1, size=16, names=(WNIDS[0], "tench"))
    with pytest.raises(DataError, match=r"^class folder 'tench' of split 'val' is not in the label map \(timm's ImageNet-1k wnids\); "):
        opened(root, "model=deit_tiny", "data=imagenet")


def test_a_train_class_outside_the_map_is_refused(tmp_path) -> None:
    root = make_image_folder(tmp_path, classes=2, per_class=2, size=16, names=WNIDS)
    (root / "train" / WNIDS[1]).rename(root / "train" / "goldfish")
    opened(root, "model=deit_tiny", "data=imagenet")  # train is not opened without calibration
    with pytest.raises(DataError, match="^class folder 'goldfish' of split 'train' is not in the label map"):
        opened(root, "model=deit_tiny", "data=imagenet", calib_size=2)


def test_more_folders_than_outputs_is_refused(tmp_path) -> None:
    root = make_image_folder(tmp_path, classes=4, per_class=1, size=16)
    with pytest.raises(DataError, match=r"^split 'val' holds 4 class folders but the model's head has 3 outputs \(more classes"):
        opened(root, *SMALL, "data=folder")


def test_a_folder_subset_without_a_map_is_refused(tmp_path) -> None:
    """A 10-class model on three ImageNet folders: the folder order would be wrong, and there is no map for it."""
    root = make_image_folder(tmp_path, classes=3, per_class=1, size=16, names=WNIDS)
    with pytest.raises(DataError, match=r"^split 'val' holds 3 class folders but the model's head has 10 outputs \(fewer"):
        opened(root, *CUSTOM, "+model.builder.num_classes=10", "data=imagenet")


def test_a_head_of_another_size_than_the_label_set_is_refused(tmp_path) -> None:
    root = make_image_folder(tmp_path, classes=3, per_class=1, size=16, names=WNIDS)
    with pytest.raises(ConfigError, match="^the label set does not fit the model: timm's ImageNet-1k wnids has 1000 classes but the model's head has 3 outputs$"):
        opened(root, *SMALL, "data=imagenet", "data.labels=imagenet-1k")
    short_map = tmp_path / "five.txt"
    short_map.write_text("\n".join(WNIDS) + "\n")
    with pytest.raises(ConfigError, match="has 5 classes but the model's head has 1000 outputs$"):
        opened(root, "model=deit_tiny", "data=imagenet", f"data.class_map={short_map}")
    with pytest.raises(ConfigError, match="^the label set does not fit the model: MNIST has 10 classes"):
        opened(REPO / "data" / "mnist", *SMALL, "data=mnist")


def test_bad_label_settings_are_one_line(tmp_path) -> None:
    root = make_image_folder(tmp_path / "data", classes=3, per_class=1, size=16)
    with pytest.raises(ConfigError, match="^data.labels='wnid': must be one of auto, imagenet-1k, folder$"):
        opened(root, *SMALL, "data=folder", "data.labels=wnid")
    with pytest.raises(DataError, match="file not found"):
        opened(root, *SMALL, "data=folder", f"data.class_map={tmp_path / 'missing.txt'}")
    duplicated = tmp_path / "dup.txt"
    duplicated.write_text("class_0\nclass_1\nclass_0\n")
    with pytest.raises(DataError, match="'class_0' is on lines 1 and 3$"):
        read_class_map(str(duplicated))
    gap = tmp_path / "gap.txt"
    gap.write_text("class_0\n\nclass_1\n")
    with pytest.raises(DataError, match="line 2 is empty"):
        read_class_map(str(gap))
    with pytest.raises(ConfigError, match="leave data.labels=auto"):
        opened(root, *SMALL, "data=folder", f"data.class_map={duplicated}", "data.labels=folder")


def test_the_cli_refuses_a_class_word_folder_with_one_line_and_no_record(tmp_path) -> None:
    root = make_image_folder(tmp_path / "data", classes=2, per_class=1, size=16, names=(WNIDS[0], "goldfish"))
    result = run_cli("model=deit_tiny", "data=imagenet", f"data.root={root}", "method=fp", f"results_dir={tmp_path / 'runs'}", *QUIET)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "class folder 'goldfish' of split 'val' is not in the label map" in errors[0], result.stderr
    assert not list((tmp_path / "runs").glob("*.json"))


# ----------------------------------------------------------------------------------------- identity


def test_the_label_map_enters_the_run_key_by_content(tmp_path) -> None:
    """Two class maps that label the same folders differently never share a key or a recorded data config; a map that
    gives the folders their sorted order labels as runs before label maps did, and keeps their data identity."""
    root = make_image_folder(tmp_path / "data", classes=3, per_class=1, size=16)
    maps = []
    for name, order in (("a.txt", "class_0\nclass_1\nclass_2\n"), ("b.txt", "class_1\nclass_0\nclass_2\n")):
        (tmp_path / name).write_text(order)
        maps.append(opened(root, *SMALL, "data=folder", f"data.class_map={tmp_path / name}"))
    first, second = (task.identity() for task in maps)
    assert "labels" not in first["data"] and maps[0].cfg.data.label_map == FOLDER_ORDER  # a.txt: the sorted order
    assert second["data"]["labels"].startswith("class_map sha256:") and run_key(first) != run_key(second)
    assert maps[1].cfg.data.label_map == second["data"]["labels"]  # the record's config, hence the report's variant

    folder = opened(root, *SMALL, "data=folder")
    assert folder.cfg.data.label_map == FOLDER_ORDER
    before = {"kind", "root", "train_split", "val_split", "max_eval_images", "channels", "img_size", "mean", "std",
              "crop_pct", "interpolation"}
    assert set(folder.identity()["data"]) == before  # conf/data/imagenet.yaml's keys before this change, less workers


def test_mnist_identity_is_unchanged() -> None:
    task = TASKS.get("classification")(config(REPO / "data" / "mnist"), False)
    data = OmegaConf.to_container(task.cfg.data, resolve=True)
    data.pop("workers")
    assert task.identity()["data"] == data and "labels" not in data and "class_map" not in data


def test_image_folder_targets_follow_the_map(tmp_path) -> None:
    root = make_image_folder(tmp_path, classes=2, per_class=1, size=16, names=(TIMM_WNIDS[42], TIMM_WNIDS[3]))
    plain = image_folder(root, "val", None)
    mapped = image_folder(root, "val", None, label_map=imagenet_1k())
    assert plain.targets == [0, 1] and mapped.targets == [3, 42] and plain.samples == [(p, t) for (p, _), t in zip(mapped.samples, [0, 1])]
