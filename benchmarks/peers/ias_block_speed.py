"""Time the official I&S-ViT block-reconstruction loop (zysxmu/IaS-ViT ``quant/block_recon.py``) per iteration.

Called by benchmarks/reconstruction_speed.py --official. It imports the official code from ``$PEER_ROOT/IaS-ViT``
(default ``../peers`` beside the clone) with ``$PEER_ROOT/timm-0.4.12`` first on the path (the RepQ-ViT lineage's
timm), and contains none of it: run-time patches only (``pretrained=False``; with ``--device cpu`` the loop's
hard-coded device 'cuda' mapped to the CPU). Setup, outside the repository, as ../shared/oracles/README.md describes:

    mkdir -p $PEER_ROOT/IaS-ViT && git --git-dir=<mirror of zysxmu/IaS-ViT> archive HEAD | tar -x -C $PEER_ROOT/IaS-ViT
    git --git-dir=<mirror> rev-parse HEAD > $PEER_ROOT/IaS-ViT/.peer_commit
    pip install --no-deps --target $PEER_ROOT/timm-0.4.12 timm==0.4.12

What runs: ``test_quant.main``'s model set-up (random-init deit_tiny under ``torch.manual_seed(seed)``, W4A4,
channel-wise weights as with ``--w_cw``, per-channel post-LayerNorm inputs, the first-64-image calibration of the
activation quantizers), then its ``block_reconstruction`` on one block with ``cali_data`` = ``--calib-size``
seeded N(0, 1) images (the oracles' convention) at ``--batch-size``: stage 1 (activations quantized, weights FP
and learned) and stage 3 (weights quantized too, "last_stage"). Seconds of each iteration are read between
consecutive steps of its learning-rate scheduler: process CPU time on the CPU (keys ``stage<n>_iter_cpu_s``), wall
time after a device synchronization on a GPU (``stage<n>_iter_wall_s``; ``clock`` names which). Prints one JSON line.
"""
import argparse, json, os, sys, time, copy, statistics
from pathlib import Path
PEER_ROOT = Path(os.environ.get("PEER_ROOT") or Path(__file__).resolve().parents[3] / "peers")
sys.path.insert(0, str(PEER_ROOT / "timm-0.4.12"))
sys.path.insert(0, str(PEER_ROOT / "IaS-ViT"))
ap = argparse.ArgumentParser()
ap.add_argument("--iters", type=int, default=30)
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--calib-size", type=int, default=64)
ap.add_argument("--block", type=int, default=0)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--stages", default="1,3")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
a = ap.parse_args()
import torch, timm
torch.set_num_threads(a.threads)
cuda = a.device == "cuda"
if not cuda:
    _to = torch.Tensor.to
    def _to_cpu(self, *args, **kw):
        args = tuple("cpu" if (isinstance(x, str) and x.startswith("cuda")) else x for x in args)
        return _to(self, *args, **kw)
    torch.Tensor.to = _to_cpu
clock = "wall" if cuda else "cpu"
def now():
    if cuda:
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()
_create = timm.create_model
timm.create_model = lambda name, pretrained=False, **kw: _create(name, pretrained=False, **kw)
import utils.build_model  # noqa: E402,F401  (the package re-exports a function of the same name)
bm = sys.modules["utils.build_model"]
bm.timm.create_model = timm.create_model
from quant import quant_model, set_quant_state
import quant.block_recon as br

times = []
_step = torch.optim.lr_scheduler.CosineAnnealingLR.step
def step(self, *args, **kw):
    times.append(now())
    return _step(self, *args, **kw)
torch.optim.lr_scheduler.CosineAnnealingLR.step = step

torch.manual_seed(a.seed)
model = bm.build_model("deit_tiny_patch16_224").eval().to(a.device)
fp_model = copy.deepcopy(model)
calib = torch.randn((a.calib_size, 3, 224, 224), generator=torch.Generator().manual_seed(a.seed + 1000)).to(a.device)
q = quant_model(model, input_quant_params={"n_bits": 4, "channel_wise": False}, weight_quant_params={"n_bits": 4, "channel_wise": True})
q = q.to(a.device).eval()
set_quant_state(q, input_quant=True, weight_quant=False)
with torch.no_grad():
    q(calib[:64])
out = {"stages": a.stages.split(","), "peer": "zysxmu/IaS-ViT", "commit": (PEER_ROOT / "IaS-ViT" / ".peer_commit").read_text().strip(), "timm": timm.__version__,
       "torch": torch.__version__, "device": a.device, "clock": clock, "threads": a.threads, "batch_size": a.batch_size, "block": a.block, "iters": a.iters}
blk, fblk = q.blocks[a.block], fp_model.blocks[a.block]
for stage in a.stages.split(","):
    last = stage == "3"
    if last:
        set_quant_state(q, input_quant=True, weight_quant=True)
        with torch.no_grad():
            q(calib[:64])
    times.clear()
    br.block_reconstruction(q, blk, fp_model, fblk, cali_data=calib, batch_size=a.batch_size, iters=a.iters, asym=True,
                            warmup=0.2, act_quant=True, weight_quant=last, opt_mode="mse", last_stage=last)
    per = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    out[f"stage{stage}_iter_{clock}_s"] = per
    out[f"stage{stage}_median_s"] = statistics.median(per)
    out[f"stage{stage}_params"] = sum(p.numel() for p in blk.parameters() if p.requires_grad)
print(json.dumps(out))
