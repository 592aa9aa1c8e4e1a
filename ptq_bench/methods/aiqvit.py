"""AIQViT (Jiang, Zhang, Wang, Yu, Guo; AAAI 2025, arXiv 2502.04628): architecture-informed PTQ for ViTs.

No official code exists; docs/methods/aiqvit.md lists every detail with its source (paper section or harness
choice). Pipeline, block by block in forward order:

1. Base quantizers as in the paper's "Preliminaries": per-channel weights, per-tensor activations, post-LayerNorm
   activations per channel during reconstruction and turned per-tensor by RepQ-ViT's scale reparameterization
   afterwards (``reparam="after"``); the post-Softmax map with the Dynamic Focusing Quantizer (ptq_bench/quant/dfq.py).
2. AILoC (Eq. 9-14): every linear layer of the block gets ΔW = B·A; its rank is chosen among ``candidate_ranks`` by a
   DARTS search (first-order alternating updates of Θ on D_train and α on D_val, ``search_iters`` iterations).
3. Block reconstruction (Eq. 10) of the chosen branches and the DFQ intervals for ``iters`` iterations on curriculum
   subsets of the calibration set (Eq. 16-17); then ΔW is folded into the weight: the deployed weight is Q(W0 + BA).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS, BitWidth, Method
from ptq_bench.methods.options import identity_options, keyed_when_on, runtime
from ptq_bench.models import calibrating, find_blocks
from ptq_bench.models.build import parameters_sha256
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.layers import QuantLinear
from ptq_bench.transforms.lowrank import (
    LowRankBranch,
    architecture_parameters,
    attach_lowrank_,
    branch_parameters,
    fold_lowrank_,
    lowrank_layers,
    usable_ranks,
)
from ptq_bench.transforms.block_capture import block_outputs, capture_block_inputs
from ptq_bench.transforms.block_losses import evaluate_losses
from ptq_bench.transforms.block_state import BlockStateStore
from ptq_bench.transforms.compiled_loss import CompiledLoss, compiled_losses
from ptq_bench.transforms.reconstruction import Curriculum, ReconStep, clamp_scales_, learnable_scales, reconstruct_block
from ptq_bench.transforms.invariants import keeps_fp_function
from ptq_bench.transforms.reparam import folded_pairs, mean_target, reparameterize_layernorm_

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AIQViTOptions:
    """Options of :class:`AIQViT`; conf/method/aiqvit.yaml gives every value with its source (paper or harness)."""

    lowrank: bool
    rank: Union[int, str]
    candidate_ranks: tuple[int, ...]
    placement: Literal["merged", "side"]
    rank_init: Literal["reinit", "warm"]
    drop_path: float
    search_iters: int
    search_val_fraction: float
    iters: int
    batch_size: int
    lr_lowrank: float
    lr_arch: float
    arch_betas: tuple[float, float]
    arch_weight_decay: float
    softmax_quantizer: str
    dfq_init: Literal["max", "mse"]
    dfq_below: Literal["b1", "zero"]
    lr_dfq: float
    learn_act_scales: bool
    lr_act: float
    curriculum: bool
    curriculum_lambda0: float
    curriculum_rerank_every: int
    curriculum_in_search: bool
    loss: Literal["mse", "fro"]
    input_source: Literal["quant", "fp"]
    reparam: Literal["after", "before", "none"]
    post_norm: Literal["refuse", "skip"]
    weight_observer: str
    act_observer: str
    patch_embed_input_bits: Optional[int]
    init_size: int
    compile: bool = keyed_when_on()  # each training step's forward and loss through torch.compile
    state_dir: Optional[str] = runtime()  # per-block checkpoints for resuming

    def __post_init__(self) -> None:
        if not (self.rank == "search" or (isinstance(self.rank, int) and self.rank > 0)):
            raise ConfigError(f"method.rank={self.rank!r}: must be 'search' or a positive integer")
        if self.placement == "side" and self.reparam == "after":
            raise ConfigError("aiqvit placement=side cannot be combined with reparam=after (the FP branch would need reparameterizing)")
        if not 0.0 < self.search_val_fraction < 1.0:
            raise ConfigError(f"aiqvit search_val_fraction must be in (0, 1), got {self.search_val_fraction}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"aiqvit drop_path must be in [0, 1), got {self.drop_path}")
        for key in ("iters", "search_iters"):
            if getattr(self, key) < 0:
                raise ConfigError(f"aiqvit {key} must be >= 0")
        for key in ("batch_size", "init_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"aiqvit {key} must be >= 1")

    def fingerprint(self, bits: BitWidth, seed: int) -> dict[str, Any]:
        """What determines a block's result (for resume checks): everything but runtime options (and ``compile``
        while off, as in the run key: block files saved before the option existed stay valid)."""
        values = identity_options(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()} | {"bits": [bits.w, bits.a], "seed": seed}


@METHODS.register("aiqvit")
class AIQViT(Method):
    name = "aiqvit"
    Options = AIQViTOptions
    role_options = {"post_softmax": "softmax_quantizer"}

    def __init__(self, bits: BitWidth, options: AIQViTOptions, seed: int = 0, progress: bool = False, **kwargs: Any) -> None:
        super().__init__(bits, options, seed, progress, **kwargs)
        self._compiled: Optional[CompiledLoss] = None  # the compiled training step while reconstructing (compile)
        self.ranks: dict[str, int] = {}  # chosen rank per linear layer
        self.block_errors: dict[str, tuple[float, float]] = {}  # block → (MSE before, MSE after)

    def needs(self) -> frozenset[str]:
        strict = self.options.reparam != "none" and self.options.post_norm == "refuse"
        return frozenset({"blocks", "layernorm_pairs"} if strict else {"blocks"})

    # ---------------------------------------------------------------- quantizers
    def placement(self) -> dict[str, QuantizerSpec | None]:
        cfg = self.options
        per_tensor = {"granularity": "tensor", "observer": cfg.act_observer}
        softmax = {"uniform": per_tensor, "dfq": {"init": cfg.dfq_init, "below": cfg.dfq_below}}.get(cfg.softmax_quantizer, {})
        patch_bits = cfg.patch_embed_input_bits
        post_norm = "channel" if cfg.reparam != "none" else "tensor"
        return {
            "weight": QuantizerSpec("uniform", "w", {"granularity": "channel", "channel_dim": 0, "observer": cfg.weight_observer}),
            "post_layernorm": QuantizerSpec("uniform", "a", {**per_tensor, "granularity": post_norm}),
            "post_softmax": QuantizerSpec(cfg.softmax_quantizer, "a", softmax),
            "patch_embed": QuantizerSpec("uniform", "a" if patch_bits is None else patch_bits, per_tensor),
            "activation": QuantizerSpec("uniform", "a", per_tensor),
        }

    def foldable_roles(self) -> frozenset[str]:
        return frozenset({"post_layernorm"} if self.options.reparam != "none" else set())

    # ---------------------------------------------------------------- pipeline
    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        cfg = self.options
        model.eval()
        fp_model = copy.deepcopy(model).eval()  # model.eval(): no dropout / stochastic depth anywhere
        for p in fp_model.parameters():
            p.requires_grad_(False)
        self.place_quantizers_(model)
        with torch.no_grad(), calibrating(model):
            data.run(model, limit=cfg.init_size)
        if cfg.reparam == "before":
            self._reparameterize(model, data)
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in flags:
            p.requires_grad_(False)
        try:
            self._reconstruct(model, fp_model, data)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        if cfg.reparam == "after":
            self._reparameterize(model, data)
        return model

    def _reparameterize(self, model: nn.Module, data: CalibrationData) -> None:
        """RepQ-ViT scale reparameterization of the post-LayerNorm quantizers (channel-mean target), then refit the
        weight quantizers of the edited Linears on their new weights (as ptq_bench/methods/repq_vit.py does)."""
        with torch.no_grad(), calibrating(model):
            with keeps_fp_function(model, data, "AIQViT LayerNorm→Linear reparameterization") as check:
                edited = reparameterize_layernorm_(model, mean_target, self.options.post_norm == "skip")
            self.transforms.append(check.record(folded=folded_pairs(model, edited)))
            for linear in edited:
                linear.quantized_weight()

    def _reconstruct(self, model: nn.Module, fp_model: nn.Module, data: CalibrationData) -> None:
        cfg = self.options
        fp_blocks = dict(find_blocks(fp_model))
        blocks = find_blocks(model)
        store = None if cfg.state_dir is None else BlockStateStore(cfg.state_dir, self._fingerprint(fp_model, data))
        bar = tqdm(blocks, desc="AIQViT blocks", disable=not self.progress)
        with compiled_losses(cfg.compile, "AIQViT reconstruction") as self._compiled:
            for index, (name, block) in enumerate(bar):
                if store is not None and store.has(name):
                    self._restore_block(store, name, block)
                    continue
                fp_in = capture_block_inputs(fp_model, fp_blocks[name], data, cfg.batch_size)
                target = block_outputs(fp_blocks[name], fp_in, cfg.batch_size)
                inputs = fp_in if cfg.input_source == "fp" else capture_block_inputs(model, block, data, cfg.batch_size)
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                everything = torch.arange(inputs.shape[0], device=inputs.device)
                before = evaluate_losses(block, inputs, target, everything, cfg.batch_size, "mse").mean().item()
                ranks = self._optimize_block(name, block, inputs, target, generator)
                after = evaluate_losses(block, inputs, target, everything, cfg.batch_size, "mse").mean().item()
                if cfg.lowrank and cfg.placement == "merged":
                    for _, layer in list(lowrank_layers(block)):
                        fold_lowrank_(layer)
                self.ranks.update(ranks)
                self.block_errors[name] = (before, after)
                log.info("AIQViT %s: block MSE %.4g -> %.4g, ranks %s", name, before, after, ranks)
                if store is not None:
                    store.save(name, block, {"ranks": ranks, "errors": [before, after]})
        self._compiled = None

    def _fingerprint(self, fp_model: nn.Module, data: CalibrationData) -> dict[str, Any]:
        return self.options.fingerprint(self.bits, self.seed) | {
            "fp_parameters_sha256": parameters_sha256(fp_model),  # saved blocks of another model are refused
            "calibration_sha256": data.fingerprint(),
        }

    def _restore_block(self, store: BlockStateStore, name: str, block: nn.Module) -> None:
        meta = store.meta(name)
        ranks: dict[str, int] = meta["ranks"]
        if self.options.lowrank and self.options.placement == "side":  # the saved state includes the branches
            for layer_name, layer in self._block_linears(name, block):
                branch = LowRankBranch(layer.out_features, layer.in_features, [ranks[layer_name]])
                attach_lowrank_(layer, branch.to(layer.weight.device), "side")
                for p in layer.lowrank.parameters():
                    p.requires_grad_(False)
        store.load(name, block)
        self.ranks.update(ranks)
        self.block_errors[name] = tuple(meta["errors"])  # type: ignore[assignment]

    @staticmethod
    def _block_linears(block_name: str, block: nn.Module) -> list[tuple[str, QuantLinear]]:
        prefix = f"{block_name}." if block_name else ""
        return [(prefix + n, m) for n, m in block.named_modules() if isinstance(m, QuantLinear)]

    # ---------------------------------------------------------------- one block
    def _optimize_block(
        self, name: str, block: nn.Module, inputs: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> dict[str, int]:
        """Rank search (if any), then the block reconstruction; returns the chosen rank per linear layer."""
        cfg = self.options
        ranks: dict[str, int] = {}
        groups: list[dict[str, Any]] = []
        if cfg.lowrank:
            ranks = self._attach_branches(name, block, inputs, target, generator)
            groups.append({"params": branch_parameters(block), "lr": cfg.lr_lowrank})
        quantizers = [m for m in block.modules() if isinstance(m, Quantizer)]
        ranges = [getattr(q, attr) for q in quantizers for attr, kind in q.learnable_parameters().items() if kind == "range"]
        if ranges:  # learned range bounds (the DFQ interval [b1, b2])
            groups.append({"params": ranges, "lr": cfg.lr_dfq})
        steps = [(q, attr) for q in quantizers for attr, kind in q.learnable_parameters().items()
                 if cfg.learn_act_scales and kind == "step_size" and q.role != "weight"]
        with learnable_scales(steps) as scales:
            if scales:
                groups.append({"params": scales, "lr": cfg.lr_act})
            if not groups or cfg.iters == 0:
                return ranks
            params = [p for g in groups for p in g["params"]]
            for p in params:
                p.requires_grad_(True)
            pool = torch.arange(inputs.shape[0], device=inputs.device)
            step = ReconStep(
                torch.optim.Adam(groups),
                pool,
                Curriculum(cfg.curriculum_lambda0, cfg.curriculum_rerank_every) if cfg.curriculum else None,
                after=lambda: clamp_scales_(scales),
            )
            reconstruct_block(
                block, inputs, target, [step], cfg.iters, cfg.batch_size, generator, cfg.loss,
                desc=f"reconstruct {name}", progress=self.progress, compile=self._compiled,
            )  # fmt: skip
            for p in params:
                p.requires_grad_(False)
        return ranks

    def _attach_branches(
        self, name: str, block: nn.Module, inputs: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> dict[str, int]:
        """Give every linear layer of the block its branch: searched (Eq. 11-14) or of the fixed rank."""
        cfg = self.options
        linears = self._block_linears(name, block)
        candidates = cfg.candidate_ranks if cfg.rank == "search" else (int(cfg.rank),)
        for _, layer in linears:
            ranks = usable_ranks(candidates, layer.out_features, layer.in_features)
            branch = LowRankBranch(layer.out_features, layer.in_features, ranks, generator)
            attach_lowrank_(layer, branch.to(layer.weight.device), cfg.placement)
        if cfg.rank == "search" and cfg.search_iters > 0 and architecture_parameters(block):  # some layer has a choice
            self._search(name, block, inputs, target, generator)
        for _, layer in linears:
            lowrank = layer.lowrank  # type: ignore[union-attr]
            if lowrank.searching:
                attach_lowrank_(layer, lowrank.select(cfg.rank_init == "warm", generator), cfg.placement)
        return {layer_name: layer.lowrank.ranks[0] for layer_name, layer in linears}  # type: ignore[union-attr]

    def _search(self, name: str, block: nn.Module, inputs: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> None:
        """First-order DARTS: alternate a Θ step on D_train and an α step on D_val (Eq. 13-14)."""
        cfg = self.options
        theta, alpha = branch_parameters(block), architecture_parameters(block)
        for p in theta + alpha:
            p.requires_grad_(True)
        n = inputs.shape[0]
        order = torch.randperm(n, generator=generator).to(inputs.device)
        n_val = min(max(1, round(cfg.search_val_fraction * n)), n - 1) if n > 1 else 0
        val_pool, train_pool = (order[:n_val], order[n_val:]) if n_val else (order, order)
        branches = [layer.lowrank for _, layer in lowrank_layers(block)]

        def resample() -> None:
            for branch in branches:
                branch.resample_drop_path(cfg.drop_path, generator)

        curriculum = Curriculum(cfg.curriculum_lambda0, cfg.curriculum_rerank_every) if cfg.curriculum and cfg.curriculum_in_search else None
        steps = [
            ReconStep(torch.optim.Adam(theta, lr=cfg.lr_lowrank), train_pool, curriculum, before=resample),
            ReconStep(
                torch.optim.Adam(alpha, lr=cfg.lr_arch, betas=cfg.arch_betas, weight_decay=cfg.arch_weight_decay),
                val_pool,
                curriculum,
                before=resample,
            ),
        ]
        for branch in branches:
            branch.train()  # drop-path on; the rest of the block stays in eval mode
        reconstruct_block(
            block, inputs, target, steps, cfg.search_iters, cfg.batch_size, generator, cfg.loss,
            desc=f"rank search {name}", progress=self.progress, compile=self._compiled,
        )  # fmt: skip
        for branch in branches:
            branch.eval()
            branch.drop_mask = None
        for p in theta + alpha:
            p.requires_grad_(False)
