"""Train the embedded default model: the ViT of conf/model/mnist_vit.yaml on the first 8,000 MNIST test images.

Run once (about 10 CPU-minutes); it writes checkpoints/mnist_vit.safetensors, which the default run and the
end-to-end tests quantize. The other 2,000 images are never seen in training: they are the evaluation split.

    python scripts/train_mnist_vit.py [--epochs 15] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from torchvision import transforms

from ptq_bench.datasets import MnistIdx

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.1307,), (0.3081,)


def build_model() -> torch.nn.Module:
    cfg = OmegaConf.load(REPO / "conf/model/mnist_vit.yaml")
    return hydra.utils.instantiate(cfg.builder)


def evaluate(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "checkpoints/mnist_vit.safetensors")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    normalize = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose([transforms.RandomCrop(28, padding=2), transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.ToTensor(), normalize])
    root = REPO / "data/mnist"
    train = DataLoader(MnistIdx(root, "train", train_tf), batch_size=128, shuffle=True)
    val = DataLoader(MnistIdx(root, "val", eval_tf), batch_size=500)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.epochs * len(train))
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        for images, labels in train:
            loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} val top-1 {evaluate(model, val):.4f} "
              f"({time.time() - start:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
