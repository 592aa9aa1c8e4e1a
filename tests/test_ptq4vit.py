"""PTQ4ViT / Base PTQ: twin-uniform grids by hand, the scale searches against brute force, the recipe end to end
on small DeiT and Swin models (all CPU, seconds). Agreement with the official code: benchmarks/compare_ptq4vit.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ptq_bench.calibration import image_calibration
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.methods.ptq4vit_capture import Recording
from ptq_bench.methods.ptq4vit_search import SearchSettings, search_linear, search_matmul
from ptq_bench.models import named_quantizers, set_quantizers_enabled
from ptq_bench.quant import QUANTIZERS, UniformQuantizer
from ptq_bench.quant.layers import QuantLinear, QuantMatMul
from ptq_bench.quant.twin_uniform import (
    TwinGeluQuantizer,
    TwinSoftmaxQuantizer,
    interval_quant,
    twin_gelu_quant,
    twin_softmax_quant,
)

CONF = Path(__file__).resolve().parent.parent / "conf" / "method"
CPU = torch.device("cpu")


def settings(metric: str = "hessian", **kw) -> SearchSettings:
    base = dict(metric=metric, eq_alpha=0.01, eq_beta=1.2, eq_n=100, search_round=1, n_split=20, chunk_numel=2**16)
    return SearchSettings(**{**base, **kw})


# ----------------------------------------------------------------------------------------------- grids


def test_twin_softmax_grid_by_hand() -> None:
    # 4 bits: 2^(4-1) - 1 = 7 steps per range. split 1/16: low step 1/112, high step 1/7
    x = torch.tensor([0.0, 0.03, 0.0625, 0.5, 1.0])
    # 0.03·112 = 3.36 → 3; 0.5·7 = 3.5 → 4 (half to even) plus the saturated low range 1/16; 1 → 1 + 1/16
    expected = torch.tensor([0.0, 3 / 112, 1 / 16, 4 / 7 + 1 / 16, 1 + 1 / 16])
    assert torch.allclose(twin_softmax_quant(x, torch.tensor(1 / 16), 4), expected, rtol=1e-6, atol=0)
    # split 1/4: Q_high(split) = round(1.75)/7 = 2/7 is added below the split too (the official code's sum)
    low = twin_softmax_quant(torch.tensor([0.0, 0.1]), torch.tensor(0.25), 4)
    assert torch.allclose(low, torch.tensor([2 / 7, 2 / 7 + 3 / 28]), rtol=1e-6, atol=0)


def test_twin_gelu_grid_by_hand() -> None:
    neg = 0.16997124254703522 / 8  # fixed negative step at 4 bits
    x = torch.tensor([-0.17, -0.05, 0.0, 0.26, 5.0])
    # -0.17/neg = -8.0 → -8; -0.05/neg = -2.35 → -2; 0.26/0.1 → 3; 5/0.1 → clamp 7
    expected = torch.tensor([-8 * neg, -2 * neg, 0.0, 0.3, 0.7])
    assert torch.allclose(twin_gelu_quant(x, torch.tensor(0.1), 4), expected, rtol=1e-6, atol=0)


def test_interval_grid_equals_symmetric_uniform_quantizer() -> None:
    x = torch.randn(4, 3, 7, 5, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([0.05, 0.2, 0.7]).view(3, 1, 1)
    q = UniformQuantizer(4, symmetric=True, granularity="channel", channel_dim=1)
    q.set_params(scale, torch.zeros_like(scale))
    assert torch.equal(q(x), interval_quant(x, scale, 4))
    assert set(interval_quant(x, scale, 4).div(scale).round().unique().tolist()) <= set(range(-8, 8))


def test_twin_quantizers_registered_and_installable() -> None:
    soft, gelu = QUANTIZERS.get("twin_softmax")(6), QUANTIZERS.get("twin_gelu")(6)
    soft.set_split(torch.tensor(2.0**-7))
    gelu.set_interval(torch.tensor(0.02))
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(soft(x), twin_softmax_quant(x, torch.tensor(2.0**-7), 6))
    assert torch.equal(gelu(x - 0.1), twin_gelu_quant(x - 0.1, torch.tensor(0.02), 6))


# ---------------------------------------------------------------------------------------------- search


def official_score(raw: torch.Tensor, sim: torch.Tensor, grad: torch.Tensor) -> float:
    """Σ_samples mean_tokens mean_features -(g·(O-Ô))², written plainly."""
    return float((-(grad * (raw - sim)) ** 2).mean(dim=-1).flatten(1).mean(dim=1).sum())


def linear_case(groups: int, twin: bool) -> tuple[QuantLinear, Recording]:
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(12, 6 * groups)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * torch.linspace(0.2, 2, 12))
    x = torch.randn(3, 5, 12, generator=g)
    x = F.gelu(x * 3) if twin else x
    QuantLinear.convert_(linear, UniformQuantizer(4, symmetric=True, granularity="channel", channel_dim=0),
                         TwinGeluQuantizer(4) if twin else UniformQuantizer(4, symmetric=True))  # fmt: skip
    with torch.no_grad():
        out = F.linear(x, linear.weight, linear.bias)
    record = Recording([[x]], [out], [torch.rand(out.shape, generator=g)])
    return linear, record


@pytest.mark.parametrize("groups,twin", [(1, False), (3, False), (1, True)], ids=["linear", "qkv", "post_gelu"])
def test_linear_search_picks_brute_force_minimum(groups: int, twin: bool) -> None:
    layer, record = linear_case(groups, twin)
    s = settings(eq_n=30)
    search_linear(layer, record, s, BitWidth(4, 4), groups)
    x, raw, grad = record.input(), record.output(), record.grad()
    w, b = layer.weight.detach(), layer.bias.detach()
    quant_x = (lambda t, a: twin_gelu_quant(t, a, 4)) if twin else (lambda t, a: interval_quant(t, a, 4))
    a0 = (x.max() if twin else x.abs().max()) / 7.5
    w_init = w.view(groups, -1).abs().amax(1) / 7.5
    rows = w.shape[0] // groups
    # weights: each group independently, input at its min-max initial scale
    best_w = []
    for gi in range(groups):
        sl = slice(gi * rows, (gi + 1) * rows)
        scores = [official_score(raw[..., sl], F.linear(quant_x(x, a0), interval_quant(w[sl], f * w_init[gi], 4), b[sl]),
                                 grad[..., sl]) for f in s.factors(CPU)]  # fmt: skip
        best_w.append(s.factors(CPU)[int(torch.tensor(scores).argmax())] * w_init[gi])
    w_q = torch.cat([interval_quant(w[gi * rows : (gi + 1) * rows], best_w[gi], 4) for gi in range(groups)])
    scores = [official_score(raw, F.linear(quant_x(x, f * a0), w_q, b), grad) for f in s.factors(CPU)]
    best_a = s.factors(CPU)[int(torch.tensor(scores).argmax())] * a0
    assert torch.allclose(layer.weight_quantizer.scale.view(groups, -1)[:, 0], torch.stack(best_w), rtol=1e-6)
    got_a = layer.input_quantizer.interval if twin else layer.input_quantizer.scale
    assert torch.allclose(got_a, best_a, rtol=1e-6)


def test_softmax_split_search_picks_brute_force_minimum() -> None:
    g = torch.Generator().manual_seed(2)
    attn = torch.softmax(torch.randn(2, 3, 9, 9, generator=g) * 4, dim=-1)
    v = torch.randn(2, 3, 9, 4, generator=g)
    raw = attn @ v
    grad = torch.rand(raw.shape, generator=g)
    layer = QuantMatMul(TwinSoftmaxQuantizer(4), UniformQuantizer(4, symmetric=True, granularity="channel", channel_dim=1))
    search_matmul(layer, Recording([[attn, v]], [raw], [grad]), settings(), 4)
    scores = [official_score(raw, twin_softmax_quant(attn, torch.tensor(2.0**-i), 4) @ v, grad) for i in range(20)]
    assert layer.quantizer_a.split.item() == 2.0 ** -int(torch.tensor(scores).argmax())
    # V's per-head scales: best per head given the chosen split
    a_sim = twin_softmax_quant(attn, layer.quantizer_a.split, 4)
    v0 = v.abs().amax(dim=(0, 2, 3)) / 7.5
    for h in range(3):
        per_head = [official_score(raw[:, h], a_sim[:, h] @ interval_quant(v[:, h], f * v0[h], 4), grad[:, h])
                    for f in settings().factors(CPU)]  # fmt: skip
        assert torch.isclose(layer.quantizer_b.scale.flatten()[h], settings().factors(CPU)[int(torch.tensor(per_head).argmax())] * v0[h])


def test_cosine_metric_search_runs_without_gradients() -> None:
    layer, record = linear_case(1, False)
    record.grads.clear()
    search_linear(layer, record, settings("cosine", eq_alpha=0.5, eq_n=20), BitWidth(4, 4), 1)
    init = layer.weight.detach().abs().max() / 7.5
    assert 0.5 * init <= layer.weight_quantizer.scale.max() <= 1.2 * init


# ---------------------------------------------------------------------------------------------- method


def deit(depth: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=depth, img_size=32).eval()


def test_ptq4vit_end_to_end_w8a8_close_to_fp() -> None:
    model = deit(2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1000))
    with torch.no_grad():
        fp = model(images)
        build_method("ptq4vit", BitWidth(8, 8)).quantize(model, image_calibration(images))
        q = model(images)
    kinds = {type(q).__name__ for _, q in named_quantizers(model)}
    assert kinds == {"UniformQuantizer", "TwinSoftmaxQuantizer", "TwinGeluQuantizer"}
    assert model.patch_embed.proj.input_quantizer is None  # a_bit=32 in the official code
    assert model.head.input_quantizer is not None and model.blocks[0].attn.qkv.weight_quantizer.scale.unique().numel() == 3
    assert not torch.equal(q, fp)
    assert F.cosine_similarity(q.flatten(), fp.flatten(), dim=0) > 0.999
    set_quantizers_enabled(model, False)
    with torch.no_grad():
        off = model(images)  # the search leaves the FP model untouched (explicit attention: ~1e-7 from fused)
    assert torch.allclose(off, fp, atol=1e-5, rtol=0)


def test_base_ptq_and_swin_end_to_end() -> None:
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=24,
                             num_heads=(1, 1, 2, 2), img_size=112, window_size=7).eval()  # fmt: skip
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1000))
    with torch.no_grad():
        fp = swin(images)
    for name in ("ptq4vit", "base_ptq"):
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=24,
                                  num_heads=(1, 1, 2, 2), img_size=112, window_size=7).eval()  # fmt: skip
        model.load_state_dict(swin.state_dict())
        with torch.no_grad():
            build_method(name, BitWidth(8, 8), eq_n=20).quantize(model, image_calibration(images))
            q = model(images)
        assert F.cosine_similarity(q.flatten(), fp.flatten(), dim=0) > 0.99, name
        w = model.patch_embed.proj.weight_quantizer.scale
        assert (w.unique().numel() > 1) == (name == "ptq4vit")  # per-channel vs layer-wise conv weight


@pytest.mark.parametrize("name", ["ptq4vit", "base_ptq"])
def test_config_files_list_every_option(name: str) -> None:
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    method = build_method(cfg, BitWidth(6, 6))
    assert method.name == name and cfg["calib_size"] == 32
    assert set(cfg) - {"name", "calib_size"} == set(vars(method.options))


def test_bad_options_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        build_method("ptq4vit", BitWidth(4, 4), metric="mse")
    with pytest.raises(ConfigError):
        build_method("base_ptq", BitWidth(4, 4), eq_alpha=1.5)
