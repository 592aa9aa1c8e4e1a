"""AdaLog (Wu et al., ECCV 2024, arXiv 2407.12951), following GoatWu/AdaLog @ 75a57d2.

The paper's "Calibrate" result: adaptive-base log quantizers on the post-Softmax map and the post-GELU input, uniform
asymmetric grids elsewhere, every grid found by FPCS on the layer's output. ``optimize: true`` adds the official
block reconstruction (``--optimize``, the README's "Retrain" column; :mod:`ptq_bench.methods.adalog_retrain`) between
the search and the shift fold, on a second set of ``optim_size`` samples loaded after the ``calib_size`` ones.

Pipeline (utils/calibrator.py ``QuantCalibrator.batching_quant_calib``, test_quant.py ``main``):

1. Every Linear, Conv2d and attention matmul is wrapped (utils/wrap_net.py). The model stays FP during calibration.
2. Layer by layer, in module order: the FP model runs the calibration set (batches of ``calib_batch_size``), the
   layer's raw inputs and output are captured, and the layer searches its grids
   (:mod:`ptq_bench.methods.adalog_search`). A post-LayerNorm Linear (qkv, fc1; only when w = a) searches a
   per-channel input grid, folds it into the LayerNorm (scale reparameterization with the mean scale and the *rounded*
   mean zero point as target), then searches again per tensor on the reparameterized input; later layers are
   captured on the reparameterized model.
3. (``optimize``) The reconstruction, from a copy of the FP model taken before the search.
4. After the last layer (after the reconstruction), fc2's shift η is folded into its bias with the quantized weight (``finish_training`` →
   ``reparam_bias``).

Layer choices (utils/wrap_net.py, configs/{3,4,6}bit.py): weights per output channel (w bits); inputs of Linears per
tensor (a bits), the head's too (qhead_a_bit = a_bit); Q, K and V per head (matmul_head_channel_wise); the post-Softmax
map AdaLog with s = 1 (s_bit = a_bit); fc2's input shifted AdaLog; the patch-embedding input unquantized.

Where the paper and the code differ, we follow the code:
* qconv_a_bit = 8 does not quantize the patch-embedding input at 8 bits: quant_layers/conv.py ``quant_input``
  returns the input unchanged for n_bits >= 8 (its < 8 branch is unusable: ``calculate_activation_candidates``
  reads an undefined ``eq_alpha``), so the configs' only value has one behaviour and is not an option here: the
  input stays float.
* The post-Softmax search scores one q per tensor on the matmul output; V's grid is per head.
* The log-base search tries q = 10 .. 10 + eq_n - 1 (the code builds 129 candidates and evaluates the first eq_n).
* The searches de-quantize with a float32 table while the quantizer evaluates with tables built in double; both are
  reproduced as written (they can differ in the last bit).
* The post-LayerNorm reparameterization is used only when w = a (``cur_a_bit == cfg.w_bit``); at W4A8 qkv/fc1
  inputs are searched per tensor directly.

Candidate stacks are evaluated in chunks of ``parallel_eq_n`` candidates, sized by the official formula from
``search_memory_gb`` (the official code reads the GPU's memory; the oracle's fake device has 8 GiB). The chunk size
changes the floating-point summation of the scores, so near-tied candidates can rank differently: other chunkings
give parameters that differ in the last bits (tests/test_adalog.py), which is why the option is part of the run's
identity and 8 reproduces the oracle bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptq_bench.architectures import architecture_for
from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.adalog_search import (
    ConvSearch,
    LinearSearch,
    MatMulSearch,
    PostGeluSearch,
    SearchSettings,
)
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.methods.options import keyed_when_on, keyed_with
from ptq_bench.models import set_quantizers_enabled
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.models.prepare import layernorm_linear_pairs
from ptq_bench.quant.adalog import AdaLogQuantizer, ShiftAdaLogQuantizer, fold_shift_into_bias_
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.adaround import RoundingAnnealing
from ptq_bench.transforms.block_capture import StopForward, forward_until_stopped
from ptq_bench.transforms.invariants import keeps_fp_function
from ptq_bench.transforms.reparam import channel_transform, folded_pairs
from ptq_bench.transforms.unit_training import UnitTraining

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaLogOptions:
    """Every option (conf/method/adalog.yaml gives the values, from configs/{3,4,6}bit.py and
    ``reconstruct_single_block``); the reconstruction's enter run keys only with ``optimize``."""

    calib_batch_size: int
    eq_n: int
    search_round: int
    steps: int
    fpcs_width: int
    search_memory_gb: float
    optimize: bool = keyed_when_on()
    optim_size: int = keyed_with("optimize")
    optim_batch_size: int = keyed_with("optimize")
    iters: int = keyed_with("optimize")
    lr_round: float = keyed_with("optimize")
    lr_act: float = keyed_with("optimize")
    round_weight: float = keyed_with("optimize")
    b_start: float = keyed_with("optimize")
    b_end: float = keyed_with("optimize")
    warmup: float = keyed_with("optimize")

    def __post_init__(self) -> None:
        for key in ("calib_batch_size", "eq_n", "search_round", "steps", "fpcs_width"):
            if getattr(self, key) < 1:
                raise ConfigError(f"AdaLog option {key} must be >= 1, got {getattr(self, key)}")
        if self.eq_n % self.fpcs_width or self.eq_n // self.fpcs_width < 2:
            raise ConfigError(f"AdaLog: eq_n ({self.eq_n}) must be a multiple of fpcs_width ({self.fpcs_width}), at least twice it")
        if self.search_memory_gb <= 0:
            raise ConfigError(f"AdaLog: search_memory_gb must be > 0, got {self.search_memory_gb}")
        if self.optim_size < 1 or self.optim_batch_size < 1 or self.iters < 0 or not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"AdaLog: optim_size and optim_batch_size must be >= 1, iters >= 0, warmup in [0, 1) "
                              f"(got {self.optim_size}, {self.optim_batch_size}, {self.iters}, {self.warmup})")


@METHODS.register("adalog")
class AdaLog(Method):
    """AdaLog calibration (configs/{3,4,6}bit.py with ``--calibrate``), and with ``optimize`` its reconstruction."""

    name = "adalog"
    Options = AdaLogOptions
    accepts_quantizers = False
    #: the per-layer searches (a recipe of the same code base swaps in its own)
    linear_search: type[LinearSearch] = LinearSearch
    matmul_search: type[MatMulSearch] = MatMulSearch
    conv_search: type[ConvSearch] = ConvSearch

    @property
    def reparameterize(self) -> bool:
        """The post-LayerNorm per-channel search and fold, which the official code applies only when w = a."""
        return self.bits.w == self.bits.a

    @property
    def optimize(self) -> bool:
        """The ``--optimize`` reconstruction (recipes of this code base whose options lack it: off)."""
        return bool(getattr(self.options, "optimize", False))

    def needs(self) -> frozenset[str]:
        return frozenset({"layernorm_pairs"} if self.reparameterize else set()) | ({"blocks"} if self.optimize else set())

    def calibration_size(self, calib_size: int) -> int:
        """``calib_size`` samples for the search, then (``optimize``) the ``optim_size`` of the reconstruction."""
        return calib_size + self.options.optim_size if self.optimize else calib_size

    def foldable_roles(self) -> frozenset[str]:
        return frozenset({"post_layernorm"} if self.reparameterize else set())

    def placement(self) -> dict[str, QuantizerSpec | None]:
        per_tensor = QuantizerSpec("uniform", "a", {"granularity": "tensor"})
        per_head = QuantizerSpec("uniform", "a", {"granularity": "channel", "channel_dim": 1})
        per_channel = QuantizerSpec("uniform", "a", {"granularity": "channel", "channel_dim": -1})
        return {
            "weight": QuantizerSpec("uniform", "w", {"granularity": "channel", "channel_dim": 0}),
            "patch_embed": None,  # qconv_a_bit = 8: the official conv leaves its input unquantized
            "conv": None,
            "post_layernorm": per_channel if self.reparameterize else per_tensor,
            "post_softmax": QuantizerSpec("adalog", "a", {"fixed_scale": True}),
            "post_gelu": QuantizerSpec("adalog_shift", "a"),
            "query": per_head,
            "key": per_head,
            "value": per_head,
            "activation": per_tensor,
        }

    def settings(self) -> SearchSettings:
        o: AdaLogOptions = self.options
        return SearchSettings(eq_n=o.eq_n, search_round=o.search_round, fpcs=True, steps=o.steps,
                              batch_size=o.calib_batch_size, memory_bytes=int(o.search_memory_gb * 2**30),
                              fpcs_width=o.fpcs_width)

    # ------------------------------------------------------------------------------------------ pipeline

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        if not self.optimize:
            self.search_(model, data)
        else:
            from ptq_bench.methods.adalog_retrain import fp_copy  # not at the top: qdrop.py's helpers import adalog.py

            size = len(data) - self.options.optim_size
            if size < 1:
                raise ConfigError(f"{self.name}: {len(data)} samples, but optimize needs calib_size + optim_size")
            fp_model = fp_copy(model)
            self.search_(model, dataclasses.replace(data, samples=data.samples[:size]))
            self.retrain_(model, fp_model, dataclasses.replace(data, samples=data.samples[size:]))
        finish_(model)
        return model

    def retrain_(self, model: nn.Module, fp_model: nn.Module, data: CalibrationData,
                 generator: torch.Generator | None = None) -> None:
        """The reconstruction on ``data`` (batches from ``generator``, by default seeded with the run's seed)."""
        from ptq_bench.methods.adalog_retrain import retrain_  # see _quantize
        o = self.options
        training = UnitTraining(o.iters, o.optim_batch_size, o.lr_round, o.lr_act, o.round_weight,
                                RoundingAnnealing(o.iters, o.warmup, o.b_start, o.b_end))
        retrain_(model, fp_model, data, training, generator or torch.Generator().manual_seed(self.seed), self.progress, self.name)

    @torch.no_grad()
    def search_(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        """The search of every layer's grids (and the LayerNorm folds), quantizers on; the shift not yet folded."""
        if not data.uniform_shapes and not self.detector:
            raise ConfigError(f"{self.name} stacks each layer's inputs over the calibration set, but this task's layers see "
                              "inputs of several shapes")
        model.eval()
        qkv = {id(m) for m in architecture_for(model).qkv_linears(model)}
        self.place_quantizers_(model)
        norms = {}
        if self.reparameterize:
            for pair in layernorm_linear_pairs(model):
                if len(pair.linears) != 1:
                    raise ConfigError(f"{self.name}: {pair.norm_name} feeds {len(pair.linears)} Linears; only one is supported")
                norms[id(pair.linears[0])] = pair.norm
        set_quantizers_enabled(model, False)  # the official layers stay in 'raw' mode until every layer is searched
        settings = self.settings()
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]
        with keeps_fp_function(model, data, "AdaLog LayerNorm→Linear reparameterization") as check:  # the folds
            for index, (name, layer) in enumerate(layers):
                if self.progress:
                    log.info("%s: calibrating %s (%d/%d)", self.name, name, index + 1, len(layers))
                inputs, output = self.layer_io(model, layer, data, settings)
                if isinstance(layer, QuantLinear):
                    self._linear(layer, inputs[0], output, settings, n_v=3 if id(layer) in qkv else 1, norm=norms.get(id(layer)))
                elif isinstance(layer, QuantConv2d):
                    self._conv(layer, inputs[0], output, settings)
                else:
                    self._matmul(layer, inputs, output, settings)
                del inputs, output
        if norms:
            folded = [layer for _, layer in layers if id(layer) in norms]
            self.transforms.append(check.record(folded=folded_pairs(model, folded)))
        set_quantizers_enabled(model, True)
        return model

    #: a detection pipeline's search (set by a method that has one before it searches a detector's layers, which see
    #: inputs of several shapes); AdaLog's own code has none
    detector = False

    def layer_io(self, model: nn.Module, layer: nn.Module, data: CalibrationData,
                 settings: SearchSettings) -> tuple[list[Any], Any]:
        """A layer's FP inputs (one entry per argument) and output over the calibration set."""
        return capture(model, layer, data, settings.batch_size)

    def _conv(self, layer: QuantConv2d, x: torch.Tensor, out: torch.Tensor, settings: SearchSettings) -> None:
        search = self.conv_search(layer, x, out, self.bits.w, settings)
        search.search()
        _install_uniform(layer.weight_quantizer, search.w_scale, search.w_zp, layer.weight.shape[:1] + (1,) * (layer.weight.ndim - 1))

    def new_linear_search(self, layer: QuantLinear, *args: Any, **kwargs: Any) -> LinearSearch:
        """The search of ``layer`` (``linear_search`` on the given arguments)."""
        return self.linear_search(*args, **kwargs)

    def _linear(self, layer: QuantLinear, x: torch.Tensor, out: torch.Tensor, settings: SearchSettings, n_v: int,
                norm: nn.LayerNorm | None) -> None:
        weight = layer.weight.detach()
        bias = layer.bias.detach() if layer.bias is not None else None
        quantizer = layer.input_quantizer
        if isinstance(quantizer, ShiftAdaLogQuantizer):
            search = PostGeluSearch(weight, bias, x, out, self.bits.w, self.bits.a, settings, n_v=n_v, shift=float(quantizer.shift))
            search.search()
            quantizer.set_params(search.a_scale, int(search.q.item()))
        elif norm is not None:
            search = self.new_linear_search(layer, weight, bias, x, out, self.bits.w, self.bits.a, settings, n_v=n_v, channel_wise=True)
            search.search_channel_wise()
            _reparameterize(search, layer, norm)
            search.search()
            quantizer.fold_to_tensor_(search.a_scale.reshape(()), search.a_zp.reshape(()))
        else:
            search = self.new_linear_search(layer, weight, bias, x, out, self.bits.w, self.bits.a, settings, n_v=n_v)
            search.search()
            _install_uniform(quantizer, search.a_scale, search.a_zp, ())
        _install_uniform(layer.weight_quantizer, search.w_scale, search.w_zp, (layer.out_features, 1))

    def _matmul(self, layer: QuantMatMul, inputs: list[torch.Tensor], out: torch.Tensor, settings: SearchSettings) -> None:
        post_softmax = isinstance(layer.quantizer_a, AdaLogQuantizer)
        search = self.matmul_search(inputs[0], inputs[1], out, self.bits.a, self.bits.a, settings, post_softmax=post_softmax)
        search.search()
        heads = search.heads
        if post_softmax:
            layer.quantizer_a.set_params(1.0, int(search.q.item()))
        else:
            _install_uniform(layer.quantizer_a, search.a_scale, search.a_zp, (heads, 1, 1))
        _install_uniform(layer.quantizer_b, search.b_scale, search.b_zp, (heads, 1, 1))


@torch.no_grad()
def finish_(model: nn.Module) -> None:
    """``finish_training`` → ``reparam_bias``: fold each post-GELU shift into its Linear's bias (quantized weight)."""
    for layer in model.modules():
        if isinstance(layer, QuantLinear) and isinstance(layer.input_quantizer, ShiftAdaLogQuantizer):
            fold_shift_into_bias_(layer)


def capture(model: nn.Module, layer: nn.Module, data: CalibrationData, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The FP inputs and output of ``layer`` over the calibration set, concatenated over batches of ``batch_size``
    (the official per-layer forward hooks; the forward stops once the layer has run)."""
    inputs: list[list[torch.Tensor]] = []
    outputs: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs.append([a.detach() for a in args])
        outputs.append(output.detach())
        raise StopForward

    forward_until_stopped(model, data, batch_size, layer.register_forward_hook(hook))
    if not outputs:
        raise RuntimeError(f"adalog: a {type(layer).__name__} was not called during calibration")
    return [torch.cat([i[k] for i in inputs], dim=0) for k in range(len(inputs[0]))], torch.cat(outputs, dim=0)


def _reparameterize(search: LinearSearch, layer: QuantLinear, norm: nn.LayerNorm) -> None:
    """``AsymmetricallyChannelWiseBatchingQuantLinear.reparam``: fold the per-channel input grid into the LayerNorm
    (target: mean scale, rounded mean zero point) and the Linear, and map the captured input accordingly."""
    scales, zero_points = search.a_scale, search.a_zp
    target_scale = torch.mean(scales).view(1)
    target_zp = torch.mean(zero_points).round().view(1)
    ratio, shift = channel_transform(scales, zero_points, target_scale, target_zp)
    norm.weight.data = norm.weight.data / ratio
    norm.bias.data = norm.bias.data / ratio.view(-1) - shift
    layer.weight.data = layer.weight.data * ratio.view(1, -1)
    compensation = torch.mm(layer.weight.data, shift.reshape(-1, 1)).reshape(-1)
    if layer.bias is None:
        layer.bias = nn.Parameter(compensation)
    else:
        layer.bias.data = layer.bias.data + compensation
    layer.refresh_weight()
    search.reparameterized(layer.weight.detach(), layer.bias.detach(), ratio, shift, target_scale, target_zp)


def _install_uniform(quantizer: Any, scale: torch.Tensor, zero_point: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(quantizer, UniformQuantizer):
        raise TypeError(f"adalog installs uniform grids, got {type(quantizer).__name__}")
    quantizer.set_params(scale.reshape(shape), zero_point.reshape(shape).to(scale.dtype))
