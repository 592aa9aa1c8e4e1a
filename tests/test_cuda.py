"""On a CUDA device (skipped without one; benchmarks/gpu_check.sh runs these): every method quantizes the shipped
MNIST ViT there and agrees with its CPU result, and the fused training quantizers equal their literal forms."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptq_bench.calibration import image_calibration
from ptq_bench.datasets import _read_idx
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.models import named_quantizers
from ptq_bench.quant.ste import tangent_ste, uniform_ste
from ste_reference import literal, literal_tangent  # tests/ste_reference.py

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
BUDGETS = {  # small budgets: the check is that each method runs on the device and agrees with the CPU
    "minmax": {},
    "repq_vit": {},
    "ptq4vit": {"search_round": 1, "eq_n": 20},
    "dopq_vit": {"iters": 4, "init_calib_size": 32},
    "aiqvit": {"search_iters": 2, "iters": 4, "init_size": 32, "batch_size": 16},
}


def mnist_model() -> torch.nn.Module:
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    model.load_state_dict(load_file(REPO / "checkpoints" / "mnist_vit.safetensors"))
    return model.eval()


def mnist_images(start: int, count: int) -> torch.Tensor:
    pixels = _read_idx(REPO / "data" / "mnist" / "t10k-images-idx3-ubyte.gz")[start : start + count]
    return torch.from_numpy(pixels.copy()).float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)


@pytest.mark.parametrize("method", sorted(BUDGETS))
def test_method_on_cuda_agrees_with_cpu(method: str) -> None:
    fp = mnist_model()
    calib, images = mnist_images(0, 32), mnist_images(8000, 256)
    results = []
    for device in (torch.device("cpu"), CUDA):
        model = copy.deepcopy(fp).to(device)
        build_method(method, BitWidth(4, 4), calib_size=32, **BUDGETS[method]).quantize(model, image_calibration(calib.to(device)))
        devices = {t.device.type for _, q in named_quantizers(model) for t in [*q.buffers(), *q.parameters()]}
        assert devices <= {device.type}, f"{method}: quantizer tensors on {devices} after quantizing on {device}"
        with torch.no_grad():
            results.append(model(images.to(device)).float().cpu())
    cpu, gpu = results
    assert torch.isfinite(gpu).all()
    assert F.cosine_similarity(cpu.flatten(), gpu.flatten(), dim=0) > 0.98
    assert (cpu.argmax(-1) == gpu.argmax(-1)).float().mean() > 0.9


def test_fused_training_quantizers_on_cuda() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 50, 64, generator=g) * 2).to(CUDA).requires_grad_(True)
    s, z = torch.tensor(0.3, device=CUDA, requires_grad=True), torch.tensor(8.0, device=CUDA)
    out = uniform_ste(x, s, z, 0, 15, (-8.0, 7.0))
    x2, s2 = x.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    ref = literal(x2, s2, z, 0, 15)
    weight = torch.randn(out.shape, generator=g).to(CUDA)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    assert torch.equal(out, ref) and torch.allclose(x.grad, x2.grad) and torch.allclose(s.grad, s2.grad, rtol=1e-3)
    attn = (torch.randn(4, 3, 20, 20, generator=g) * 3).softmax(-1).to(CUDA)
    a1, a2 = attn.clone().requires_grad_(True), attn.clone().requires_grad_(True)
    theta0, theta1 = torch.tensor(-0.75, device=CUDA), torch.tensor(0.75, device=CUDA)
    y1, y2 = tangent_ste(a1, theta0, theta1, 4), literal_tangent(a2, theta0, theta1, 4)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(y1, y2) and torch.allclose(a1.grad, a2.grad, rtol=1e-4, atol=1e-6)
