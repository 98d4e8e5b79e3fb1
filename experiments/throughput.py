"""Training-step time and sampling throughput: our network under the ``config.compute`` speed options, and side by
side with the peers' networks of the same size (diffusers' ``UNet2DModel`` and score_sde_pytorch's DDPM).

    python -m experiments.throughput [--config vp_cifar] [--batch-size 8] [--device cpu] [--steps 3] [--rounds 3]
        [--threads 1] [--variants baseline,fused_adam,foreach_ema,fast,bf16,channels_last,compile,reference_ops|none]
        [--peers ours,ours_bf16,ours_ref,diffusers,score_sde|none] [--score-sde PATH] [--eval-batch 64] [--profile]
        [--ours-compute autocast=bf16,channels_last=true,compile=true]
        [--quick] [--out DIR]

**Variants** (``--variants``): each is one full training update as ``run/train.py`` does it (loss forward under the
variant's autocast, backward, gradient clipping, Adam of the variant's implementation, EMA update), on the same batch.
The variants are timed in interleaved rounds (round r times every variant once, in turn), so a machine whose load
changes during the run biases none of them; the table gives the median over rounds and the ratio to ``baseline``
(per-tensor loop Adam, loop EMA, float32, contiguous).  ``baseline``; ``fused_adam`` (compute.adam_impl=fused, foreach
where fused is unsupported); ``foreach_ema``; ``fast`` (fused Adam + foreach EMA: the CPU default); ``bf16`` (fast +
compute.autocast=bf16); ``channels_last`` (fast + NHWC, image data only); ``compile`` (fast + torch.compile of the
network; its compile time is printed apart and not in the table); ``reference_ops`` (fast, with the U-Net's 1x1
projections as ``Conv2d`` and attention as einsum + softmax: the network before the GEMM / SDPA change).

**Peers** (``--peers``, on ``--peer-config``, default vp_cifar): ``ours`` (our U-Net, our training update with the
config's compute defaults, or with ``--ours-compute`` — the GPU figure: autocast=bf16,channels_last=true,compile=true), ``ours_bf16`` (the same with bf16 autocast in the update and the evaluations: on a CPU with
AVX512-BF16 / AMX the fast way to run ours; its ratios are the ``bf16_*`` columns), ``ours_ref`` (the same under
``unet.reference_ops()``), ``diffusers`` (``UNet2DModel`` in
DDPM's CIFAR-10 configuration, built from the config's sizes: block_out_channels nf * ch_mult, layers_per_block,
attention blocks at attn_resolutions, dropout, eps 1e-6, one head; trained by *our* update — loss, Adam, EMA — so the
ratio is the network's), ``score_sde`` (score_sde_pytorch's ``models/ddpm.py`` DDPM from a local checkout given by
``--score-sde PATH``, configured by its own ``configs/vp/ddpm/cifar10.py`` and trained by its own ``losses.get_step_fn``
— DDPM loss, its Adam, gradient clipping, its EMA — i.e. its full training step; skipped with a message when the path
is missing).  Interleaved like the variants; columns: network forward (no grad, eval mode) and full training step at
``--batch-size`` (medians of this process's CPU time on a CPU device — a shared machine's wall clock measures the
other jobs too, it is shown for the step — and of the wall clock on CUDA), activation memory (CPU: bytes of the
tensors autograd saves for backward in one training forward, parameters excluded; CUDA: peak allocation of one step
above what was allocated before it), network evaluations per second at ``--eval-batch`` (no grad), and ratios ours
vs each peer (> 1: ours is faster).  ``--profile`` prints where one training step of each peer goes (torch.profiler self time
grouped: conv3x3, conv1x1, GEMM (1x1 projections, attention products, dense layers), attention (SDPA / softmax),
GroupNorm, Adam, EMA, gradient clipping, other; and by phase: forward, backward, optimiser, EMA).

Outputs: stdout and ``<out>/results.md`` + ``throughput.csv`` (variants), ``peers.csv``, ``profile.csv``.
``--quick`` (CI-sized: variants baseline and fast on toy_2d, batch 4, one round; peers ours and, when importable,
diffusers on a tiny CIFAR-like U-Net) asserts that every update gives a finite loss and that the peer rows exist;
speed itself is never asserted.
"""
import importlib
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from experiments._common import Checks, Report, Table, make_parser, parse_and_run, prepare_out  # noqa: E402

from sde_diffusion import configs, networks  # noqa: E402
from sde_diffusion.ema import ExponentialMovingAverage  # noqa: E402
from sde_diffusion.losses import get_loss_fn  # noqa: E402
from sde_diffusion.networks.unet import reference_ops  # noqa: E402
from sde_diffusion.run.sampling import data_shape  # noqa: E402
from sde_diffusion.run.train import build_optimizer  # noqa: E402
from sde_diffusion.run.utils import get_device  # noqa: E402

VARIANTS = {
    "baseline": dict(adam_impl="loop", ema_foreach=False),
    "fused_adam": dict(adam_impl="fused", ema_foreach=False),
    "foreach_ema": dict(adam_impl="loop", ema_foreach=True),
    "fast": dict(adam_impl="auto", ema_foreach=True),
    "bf16": dict(adam_impl="auto", ema_foreach=True, autocast="bf16"),
    "channels_last": dict(adam_impl="auto", ema_foreach=True, channels_last=True),
    "compile": dict(adam_impl="auto", ema_foreach=True, compile=True),
    "reference_ops": dict(adam_impl="auto", ema_foreach=True, reference_ops=True),
}
PEERS = ("ours", "ours_bf16", "ours_ref", "diffusers", "score_sde")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_update(config, options, x, device, model=None):
    """One training update of ``config`` with the speed ``options`` (a ``compute`` sub-dict, plus
    ``reference_ops``); returns ``(update, model, ema)``.  The network (``model``, or the config's, initialised from
    the same seed for every variant) is trained by our loss, Adam and EMA."""
    from sde_diffusion.run.train import _fused_supported
    options = dict(options)
    reference = bool(options.pop("reference_ops", False))
    torch.manual_seed(0)
    model = (model if model is not None else networks.get_network(config)).to(device)
    images = x.dim() == 4
    channels_last = bool(options.get("channels_last")) and images
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    c = config.copy_and_resolve_references()
    for k, v in options.items():
        c.compute[k] = v
    if c.compute.adam_impl == "fused" and not _fused_supported(list(model.parameters())):
        c.compute.adam_impl = "foreach"
    ema = ExponentialMovingAverage(model, config.model.ema_rate, foreach=bool(c.compute.ema_foreach))
    opt = build_optimizer(c, model.parameters())
    net = torch.compile(model) if options.get("compile") else model
    loss_fn = get_loss_fn(config, configs.build_sde(config))
    bf16 = options.get("autocast") == "bf16"
    record = torch.profiler.record_function

    def update():
        with reference_ops(reference):
            with record("forward"), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(net, x, None, train=True)
            opt.zero_grad(set_to_none=True)
            with record("backward"):
                loss.backward()
        with record("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        opt.step()
        with record("ema"):
            ema.update(model)
        return float(loss.detach())
    return update, model, ema


# ------------------------------------------------------------------------------------------------- peers
class Peer:
    """A network with ``forward(x, t)`` (t: (B,) continuous time in (0, 1]) and ``step()`` (one full training update
    on the fixed batch, returns the loss)."""

    def __init__(self, name: str, model: torch.nn.Module, forward: Callable, step: Callable, note: str):
        self.name, self.model, self.forward, self.step, self.note = name, model, forward, step, note


def peer_config(name: str, quick: bool):
    """The config the peers are built at: ``name`` (default vp_cifar); quick: a tiny CIFAR-like U-Net (nf 32, two
    levels, attention at 8x8, 16x16 images) that every peer can be built at (GroupNorm with 32 groups)."""
    config = configs.get_config(name)
    if quick:
        config.data.image_size = 16
        config.data.num_channels = 3
        config.model.nf = 32
        config.model.ch_mult = (1, 2)
        config.model.num_res_blocks = 1
        config.model.attn_resolutions = (8,)
        config.model.num_classes = 0
    return config


OURS_COMPUTE = ("autocast", "adam_impl", "ema_foreach", "channels_last", "compile")


def parse_compute(text: Optional[str]) -> dict:
    """``"autocast=bf16,channels_last=true"`` -> ``{"autocast": "bf16", "channels_last": True}``."""
    options = {}
    for item in filter(None, (v.strip() for v in (text or "").split(","))):
        key, _, value = item.partition("=")
        if key not in OURS_COMPUTE or not value:
            raise ValueError(f"--ours-compute takes KEY=VALUE pairs with KEY in {', '.join(OURS_COMPUTE)}, got "
                             f"{item!r}")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def build_ours(config, x, device, reference=False, options=None, name=None):
    """Our U-Net and our update, with the ``compute`` ``options`` (``--ours-compute``: e.g. bf16 + channels_last +
    compile for the GPU figure) applied to both the step and the forward."""
    options = dict(options or {})
    update, model, _ = build_update(config, {**options, "reference_ops": reference}, x, device)
    net = torch.compile(model) if options.get("compile") else model
    channels_last, bf16 = bool(options.get("channels_last")), options.get("autocast") == "bf16"

    def forward(xb, t):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with reference_ops(reference), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(xb, t)
    note = "our U-Net, 1x1 as Conv2d + einsum attention (before)" if reference else "our U-Net (GEMM 1x1 + SDPA)"
    extra = f" with {', '.join(f'{k}={v}' for k, v in options.items())}" if options else ""
    return Peer(name or ("ours_ref" if reference else "ours"), model, forward, update, note + "; our update" + extra)


def diffusers_ddpm_kwargs(config) -> dict:
    """``UNet2DModel`` arguments for DDPM's architecture at the config's sizes (google/ddpm-cifar10-32's config at
    vp_cifar's: block_out_channels (128, 256, 256, 256), layers_per_block 2, attention at 16x16)."""
    m = config.model
    chans = tuple(int(m.nf) * int(c) for c in m.ch_mult)
    res = [int(config.data.image_size) // 2 ** i for i in range(len(chans))]
    attn = {int(r) for r in m.attn_resolutions}
    down = tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res))
    return dict(sample_size=int(config.data.image_size), in_channels=int(config.data.num_channels),
                out_channels=int(config.data.num_channels), block_out_channels=chans,
                layers_per_block=int(m.num_res_blocks), down_block_types=down, up_block_types=up,
                dropout=float(m.dropout), norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None,
                freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, act_fn="silu")


class _DiffusersNet(torch.nn.Module):
    """``UNet2DModel`` behind our network interface: ``(x, t, y) -> eps``, timestep = time_scale * t (our
    positional embedding's argument), parameterization noise."""

    def __init__(self, unet, time_scale: float):
        super().__init__()
        self.unet = unet
        self.time_scale = float(time_scale)
        self.parameterization = "noise"
        self.time_convention = "continuous"

    def forward(self, x, t, y=None):
        return self.unet(x, t * self.time_scale).sample


def build_diffusers(config, x, device):
    try:
        from diffusers import UNet2DModel
    except Exception as e:             # noqa: BLE001 — any import failure means: no diffusers peer
        return None, f"diffusers is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    torch.manual_seed(0)
    net = _DiffusersNet(UNet2DModel(**diffusers_ddpm_kwargs(config)), config.model.time_scale)
    update, model, _ = build_update(config, {}, x, device, model=net)

    def forward(xb, t):
        return model(xb, t)
    import diffusers
    return Peer("diffusers", model, forward, update, f"diffusers {diffusers.__version__} UNet2DModel (DDPM CIFAR-10 "
                "configuration); our update"), None


SCORE_SDE_MODULES = ("configs", "models", "losses", "sde_lib")


def load_score_sde(path: Optional[str]):
    """Import score_sde_pytorch's modules from a local checkout at ``path`` (its root on ``sys.path``, as its
    ``main.py`` runs): ``configs.vp.ddpm.cifar10``, ``models.ddpm``, ``models.ema``, ``losses``, ``sde_lib``.  Returns
    ``(modules, None)`` or ``(None, why not)``."""
    if not path:
        return None, "no score_sde_pytorch checkout given (--score-sde PATH): the score_sde row is skipped"
    path = os.path.abspath(os.path.expanduser(path))
    needed = ["models/ddpm.py", "models/ema.py", "losses.py", "sde_lib.py", "configs/vp/ddpm/cifar10.py"]
    missing = [f for f in needed if not os.path.isfile(os.path.join(path, f))]
    if missing:
        return None, f"{path} is not a score_sde_pytorch checkout (missing {', '.join(missing)}): score_sde skipped"
    clash = [m for m in SCORE_SDE_MODULES if m in sys.modules
             and not os.path.abspath(getattr(sys.modules[m], "__file__", None) or
                                     next(iter(getattr(sys.modules[m], "__path__", [""])), "")).startswith(path)]
    if clash:
        return None, f"modules named {', '.join(clash)} are already imported from elsewhere: score_sde skipped"
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        mods = {name: importlib.import_module(name) for name in
                ("configs.vp.ddpm.cifar10", "models.ddpm", "models.ema", "losses", "sde_lib")}
    except Exception as e:             # noqa: BLE001 — reported, the other peers still run
        return None, f"score_sde_pytorch at {path} could not be imported ({type(e).__name__}: {e}): score_sde skipped"
    return mods, None


def build_score_sde(path, config, x, device):
    """score_sde's DDPM (``configs/vp/ddpm/cifar10.py``, sizes set from ``config``) and its own training step
    (``losses.get_step_fn``: DDPM loss, Adam, warm-up and clipping in ``optimization_manager``, its EMA)."""
    mods, why = load_score_sde(path)
    if mods is None:
        return None, why
    try:
        c = mods["configs.vp.ddpm.cifar10"].get_config()
        m = config.model
        c.model.nf, c.model.ch_mult = int(m.nf), tuple(int(v) for v in m.ch_mult)
        c.model.num_res_blocks, c.model.attn_resolutions = int(m.num_res_blocks), tuple(m.attn_resolutions)
        c.model.dropout = float(m.dropout)
        c.data.image_size, c.data.num_channels = int(config.data.image_size), int(config.data.num_channels)
        c.device = device
        torch.manual_seed(0)
        model = mods["models.ddpm"].DDPM(c).to(device)
        losses, sde_lib = mods["losses"], mods["sde_lib"]
        sde = sde_lib.VPSDE(beta_min=c.model.beta_min, beta_max=c.model.beta_max, N=c.model.num_scales)
        optimizer = losses.get_optimizer(c, model.parameters())
        ema = mods["models.ema"].ExponentialMovingAverage(model.parameters(), decay=c.model.ema_rate)
        step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(c),
                                     reduce_mean=c.training.reduce_mean, continuous=c.training.continuous,
                                     likelihood_weighting=c.training.likelihood_weighting)
    except Exception as e:             # noqa: BLE001 — a checkout whose API differs: reported, not fatal
        return None, f"score_sde_pytorch's DDPM could not be built ({type(e).__name__}: {e}): score_sde skipped"
    # past the warm-up, so the learning rate is the configured one (timing does not depend on it)
    state = dict(optimizer=optimizer, model=model, ema=ema, step=int(c.optim.warmup))
    ema_update = ema.update

    def update_ema(params):
        with torch.profiler.record_function("ema"):
            return ema_update(params)
    ema.update = update_ema
    n = int(c.model.num_scales)

    def step():
        with torch.profiler.record_function("forward"):      # their step: forward, backward, optimiser, EMA
            loss = step_fn(state, x)
            return float(loss.detach() if torch.is_tensor(loss) else loss)

    def forward(xb, t):
        return model(xb, torch.round(t * (n - 1)).long())
    return Peer("score_sde", model, forward, step, f"score_sde_pytorch DDPM ({path}); its own step_fn"), None


# ------------------------------------------------------------------------------------------------- measuring
def activation_bytes(peer, x, t, device) -> float:
    """CPU: bytes of the tensors autograd saves for backward in one training forward (parameters excluded, each
    storage once).  CUDA: the peak allocation of one full step above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        peer.step()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    params = {p.untyped_storage().data_ptr() for p in peer.model.parameters()}
    seen: Dict[int, int] = {}

    def pack(tensor):
        try:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return tensor
    peer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = peer.forward(x, t)
    del out
    return float(sum(seen.values()))


PROFILE_CATEGORIES = ("conv3x3", "conv1x1", "GEMM", "attention", "norm", "elementwise", "adam", "ema", "clip",
                      "other")
_ELEMENTWISE = {"silu", "silu_", "silu_backward", "add", "add_", "mul", "mul_", "div", "div_", "sub", "sub_", "rsub",
                "neg", "bernoulli_", "dropout", "native_dropout", "native_dropout_backward", "sum", "mean", "copy_",
                "cat", "pow", "sqrt", "rsqrt", "exp", "sin", "cos", "square", "mse_loss", "mse_loss_backward",
                "where", "clone", "contiguous", "lerp_", "fill_", "zero_", "upsample_nearest2d",
                "upsample_nearest2d_backward", "avg_pool2d", "avg_pool2d_backward", "threshold_backward", "expand"}


def _kernel_size(shapes) -> Optional[int]:
    for s in shapes or ():
        if isinstance(s, (list, tuple)) and len(s) == 4 and s[2] == s[3] and s[2] in (1, 3):
            return int(s[2])
    return None


def _categorise(ev) -> str:
    p = ev.cpu_parent
    chain = [ev.name]
    while p is not None:
        chain.append(p.name)
        p = p.cpu_parent
    for name in chain:
        if name.startswith("Optimizer.step#") or name.startswith("Optimizer.zero_grad#"):
            return "adam"
        if name == "ema":
            return "ema"
        if name == "clip":
            return "clip"
    n = ev.name.lower()
    if "conv" in n:
        k = _kernel_size(ev.input_shapes)
        return "conv3x3" if k == 3 else "conv1x1" if k == 1 else "other"
    if any(s in n for s in ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax")):
        return "attention"
    if n.split("::")[-1] in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum", "addbmm"):
        return "GEMM"
    if "group_norm" in n:
        return "norm"
    if n.split("::")[-1] in _ELEMENTWISE:
        return "elementwise"
    return "other"


def _phase(ev) -> str:
    p, names = ev, []
    while p is not None:
        names.append(p.name)
        p = p.cpu_parent
    for name in names:
        if name.startswith("Optimizer.") or name in ("ema", "clip"):
            return "update"
        if name.startswith("autograd::engine::evaluate_function") or name == "backward":
            return "backward"
    return "forward"


def profile_step(peer, device) -> Dict[str, Dict[str, float]]:
    """Self time (ms) of one training step of ``peer`` by op category and by phase."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clip = torch.nn.utils.clip_grad_norm_

    def clip_recorded(*a, **k):
        with torch.profiler.record_function("clip"):
            return clip(*a, **k)
    torch.nn.utils.clip_grad_norm_ = clip_recorded       # score_sde's optimize_fn calls it by attribute
    try:
        with profile(activities=acts, record_shapes=True) as prof:
            peer.step()
            sync(device)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    cats = {c: 0.0 for c in PROFILE_CATEGORIES}
    phases = {p: 0.0 for p in ("forward", "backward", "update")}
    for ev in prof.events():
        us = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
        if us <= 0:
            continue
        cats[_categorise(ev)] += us / 1e3
        phases[_phase(ev)] += us / 1e3
    return {"categories": cats, "phases": phases}


def main(argv: Optional[Sequence[str]] = None):
    p = make_parser("throughput", __doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="config of the variants (default vp_cifar; quick toy_2d)")
    p.add_argument("--peer-config", default="vp_cifar", help="config whose U-Net sizes the peers are built at "
                   "(quick: a tiny CIFAR-like U-Net)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8; quick 4")
    p.add_argument("--steps", type=int, default=None, help="timed training updates per variant and round (default 3; "
                   "quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, the table gives the median (default 3;"
                   " quick 1)")
    p.add_argument("--evals", type=int, default=None, help="timed score evaluations after one warm-up (default 10; "
                   "quick 2)")
    p.add_argument("--eval-batch", type=int, default=None, help="batch of the peers' evaluations/s (default 64; "
                   "quick 8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)}, or none (default "
                   f"baseline,fused_adam,foreach_ema,fast,bf16,channels_last; quick baseline,fast)")
    p.add_argument("--peers", default=None, help=f"comma-separated, from {', '.join(PEERS)}, or none (default "
                   "ours,diffusers,score_sde; score_sde needs --score-sde)")
    p.add_argument("--score-sde", default=os.environ.get("SCORE_SDE_PATH"),
                   help="local checkout of yang-song/score_sde_pytorch (default $SCORE_SDE_PATH)")
    p.add_argument("--ours-compute", default="", help="compute options of the ours / ours_ref peers, e.g. "
                   "autocast=bf16,channels_last=true,compile=true (the GPU figure); default: the config's")
    p.add_argument("--profile", action="store_true", help="profile one training step of every peer")
    return parse_and_run(p, lambda args: run(args, p), argv)


def run(args, parser):
    quick = args.quick
    pick = (lambda v, full, small: v if v is not None else (small if quick else full))
    config_name = pick(args.config, "vp_cifar", "toy_2d")
    batch_size, steps = pick(args.batch_size, 8, 4), pick(args.steps, 3, 1)
    rounds, evals = pick(args.rounds, 3, 1), pick(args.evals, 10, 2)
    eval_batch = pick(args.eval_batch, 64, 8)
    variants = pick(args.variants, "baseline,fused_adam,foreach_ema,fast,bf16,channels_last", "baseline,fast")
    for key, v in (("batch-size", batch_size), ("steps", steps), ("rounds", rounds), ("evals", evals),
                   ("eval-batch", eval_batch)):
        if v < 1:
            parser.error(f"--{key} must be >= 1, got {v}")
    names = [v.strip() for v in variants.split(",") if v.strip() and v.strip() != "none"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; available: {', '.join(VARIANTS)}")
    if names and "baseline" not in names:
        names.insert(0, "baseline")
    peer_names = [v.strip() for v in (args.peers or "ours,diffusers,score_sde").split(",")
                  if v.strip() and v.strip() != "none"]
    unknown = [v for v in peer_names if v not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; available: {', '.join(PEERS)}")
    if peer_names and "ours" not in peer_names:
        peer_names.insert(0, "ours")
    try:
        config = configs.get_config(config_name)
        pconfig = peer_config(args.peer_config, quick) if peer_names else None
    except configs.ConfigError as e:
        parser.error(str(e))
    if pconfig is not None and (pconfig.model.name != "unet" or pconfig.data.dataset.lower() == "toy"):
        parser.error(f"--peer-config must be an image config with the unet network, got {args.peer_config}")
    try:
        parse_compute(args.ours_compute)
    except ValueError as e:
        parser.error(str(e))
    out = prepare_out(args.out)
    report = Report(out, f"Training-update and sampling throughput of {config_name}" + (" (quick)" if quick else ""))
    check = Checks(quick)
    device = get_device(args.device)
    result = run_variants(config, config_name, names, batch_size, steps, rounds, evals, device, args, report,
                          check) if names else {}
    if peer_names:
        run_peers(pconfig, peer_names, batch_size, steps, rounds, evals, eval_batch, device, args, report, check)
    check.finish(report)
    return result


def run_variants(config, config_name, names, batch_size, steps, rounds, evals, device, args, report, check):
    shape = (batch_size, *data_shape(config))
    torch.manual_seed(args.seed + 1)
    x = (torch.rand(shape) * 2 - 1).to(device)
    if x.dim() != 4:
        names = [n for n in names if n not in ("channels_last", "reference_ops")]
    updates = {}
    for name in names:
        t0 = time.perf_counter()
        update, model, ema = build_update(config, VARIANTS[name], x, device)
        loss = update()                              # warm-up (and compilation)
        sync(device)
        check(math.isfinite(loss), f"{name}: the first update's loss is finite ({loss:.4g})")
        updates[name] = update
        if name == "compile":
            report.note(f"compile: first update (compilation) took {time.perf_counter() - t0:.1f} s")
        if name == "baseline":
            base_model, base_ema = model, ema
    report.note(f"config {config_name}: {config.model.name} with {networks.count_parameters(base_model):,} "
                f"parameters; device {device} ({torch.get_num_threads()} CPU threads); batch {batch_size}; "
                f"{rounds} interleaved rounds x {steps} updates")

    times = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                updates[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    base = statistics.median(times["baseline"])
    table = Table("throughput", ["variant", "ms_per_update", "speedup_vs_baseline"],
                  title="One training update (median over rounds)")
    for name in names:
        med = statistics.median(times[name])
        table.add(variant=name, ms_per_update=med * 1e3, speedup_vs_baseline=base / med)
    report.table(table)
    report.note(f"{config.training.n_iters:,} updates at batch {batch_size} (baseline): "
                f"{config.training.n_iters * base / 3600:.1f} h")

    score_fn = networks.get_score_fn(configs.build_sde(config), base_ema.model)
    t = torch.full((batch_size,), 0.5, device=device)
    with torch.no_grad():
        score_fn(x, t)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(evals):
            score_fn(x, t)
        sync(device)
    eval_time = (time.perf_counter() - t0) / evals
    report.note(f"sampling: {1 / eval_time:.2f} batched score evaluations/s = "
                f"{batch_size / eval_time:.1f} sample-evaluations/s "
                f"({config.sampling.method}, {config.sampling.num_steps} steps: about "
                f"{config.sampling.num_steps * eval_time / batch_size:.2f} s per sample)")
    return {name: statistics.median(v) for name, v in times.items()}


def _timed(fn, n, device):
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - w0) / n, (time.process_time() - c0) / n


def run_peers(config, peer_names, batch_size, steps, rounds, evals, eval_batch, device, args, report, check):
    """Ours and the peers side by side at the same sizes, interleaved; see the module docstring."""
    ours_compute = parse_compute(args.ours_compute)
    shape = (batch_size, int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))
    g = torch.Generator().manual_seed(args.seed + 2)
    x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    t = torch.full((batch_size,), 0.5, device=device)
    x64 = (torch.rand((eval_batch, *shape[1:]), generator=g) * 2 - 1).to(device)
    t64 = torch.full((eval_batch,), 0.5, device=device)
    peers: List[Peer] = []
    for name in peer_names:
        if name in ("ours", "ours_ref"):
            peer, why = build_ours(config, x, device, reference=name == "ours_ref", options=ours_compute), None
        elif name == "ours_bf16":           # ours with bf16 autocast in the step and the evaluations
            peer = build_ours(config, x, device, options={**ours_compute, "autocast": "bf16"}, name=name)
            why = None
        elif name == "diffusers":
            peer, why = build_diffusers(config, x, device)
        else:
            peer, why = build_score_sde(args.score_sde, config, x, device)
        if peer is None:
            report.note(f"peer {name}: {why}")
            continue
        loss = peer.step()                          # warm-up
        sync(device)
        check(math.isfinite(loss), f"peer {name}: the first training step's loss is finite ({loss:.4g})")
        peers.append(peer)
    if args.quick:
        got = {p.name for p in peers}
        check("ours" in got, "the peers table has our row")
        if "diffusers" in peer_names:
            try:
                import diffusers  # noqa: F401
                check("diffusers" in got, "diffusers is importable and the peers table has its row")
            except Exception:                  # noqa: BLE001
                pass
    report.note(f"peers at {args.peer_config}{' (quick: tiny)' if args.quick else ''} sizes: "
                + "; ".join(f"{p.name}: {networks.count_parameters(p.model):,} parameters, {p.note}" for p in peers)
                + f". Device {device} ({torch.get_num_threads()} CPU threads); batch {batch_size}, evaluations at "
                  f"batch {eval_batch}; {rounds} interleaved rounds x {steps} calls")

    mem = {p.name: activation_bytes(p, x, t, device) for p in peers}
    # the clock of the ratios: this process's CPU time on a CPU device (on a shared machine the wall clock mostly
    # measures the other jobs), the wall clock (after synchronising) on CUDA; the step's wall time is shown as well
    clock = 0 if device.type == "cuda" else 1
    fwd, step, step_wall, ev = ({p.name: [] for p in peers} for _ in range(4))
    for _ in range(rounds):
        for p in peers:
            p.model.eval()
            with torch.no_grad():
                fwd[p.name].append(_timed(lambda: p.forward(x, t), steps, device)[clock])
            timed = _timed(p.step, steps, device)
            step[p.name].append(timed[clock])
            step_wall[p.name].append(timed[0])
    for p in peers:                                 # warm-up at the evaluation batch
        p.model.eval()
        with torch.no_grad():
            p.forward(x64, t64)
    for _ in range(rounds):
        for p in peers:
            p.model.eval()
            with torch.no_grad():
                ev[p.name].append(_timed(lambda: p.forward(x64, t64), max(1, evals // rounds), device)[clock])
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in
           (("fwd", fwd), ("step", step), ("step_wall", step_wall), ("ev", ev))}
    ours = "ours"
    bf16 = ["bf16_step_speedup", "bf16_evals_ratio"] if "ours_bf16" in med["step"] else []
    table = Table("peers", ["network", "params", "forward_ms", "step_ms", "step_wall_ms", "activations_MB",
                            "evals_per_s", "ours_fwd_speedup", "ours_step_speedup", "ours_evals_ratio"] + bf16,
                  title=f"Ours vs peers at batch {batch_size} ({'wall' if clock == 0 else 'CPU'}-time medians over "
                        f"{len(fwd[ours])} interleaved rounds; speedup / ratio > 1: ours faster)")
    for p in peers:
        n = p.name
        table.add(network=n, params=networks.count_parameters(p.model), forward_ms=med["fwd"][n] * 1e3,
                  step_ms=med["step"][n] * 1e3, step_wall_ms=med["step_wall"][n] * 1e3,
                  activations_MB=mem[n] / 2 ** 20, evals_per_s=1 / med["ev"][n],
                  ours_fwd_speedup=med["fwd"][n] / med["fwd"][ours],
                  ours_step_speedup=med["step"][n] / med["step"][ours],
                  ours_evals_ratio=med["ev"][n] / med["ev"][ours],
                  **({"bf16_step_speedup": med["step"][n] / med["step"]["ours_bf16"],
                      "bf16_evals_ratio": med["ev"][n] / med["ev"]["ours_bf16"]} if bf16 else {}))
    report.table(table)
    report.note(("forward_ms, step_ms, evals_per_s: wall clock" if clock == 0 else
                 "forward_ms, step_ms, evals_per_s: CPU time of this process (the wall clock of a shared CPU measures "
                 "the other jobs too; step_wall_ms shows it)") + "; activations_MB: " + ("peak allocation of one step above the allocation before it (CUDA)"
                                      if device.type == "cuda" else
                                      "tensors saved for backward by one training forward, parameters excluded (CPU "
                                      "estimate; parameters, gradients, Adam moments and EMA add 5 x 4 bytes per "
                                      "parameter for every network alike)")
                + f"; evals_per_s: network evaluations (no grad) of a batch of {eval_batch} per second"
                + ("; bf16_*: the same ratios for ours_bf16 (our network and update under bf16 autocast: "
                   "compute.autocast=bf16 in training, sampling.autocast=bf16 in sampling)" if bf16 else ""))
    if args.profile:
        prof = Table("profile", ["network", "total_ms", "forward_pct", "backward_pct", "update_pct"]
                     + [f"{c}_pct" for c in PROFILE_CATEGORIES],
                     title="Where one training step goes (torch.profiler self time, % of the step)")
        for p in peers:
            r = profile_step(p, device)
            total = sum(r["categories"].values())
            row = {f"{c}_pct": 100 * v / total for c, v in r["categories"].items()}
            row.update({f"{c}_pct": 100 * v / total for c, v in r["phases"].items()})
            prof.add(network=p.name, total_ms=total, **row)
        report.table(prof)
        report.note("profile: phases forward / backward / update (Adam + EMA + clipping); categories: GEMM = "
                    "matmuls (1x1 projections as GEMMs, attention products outside a fused kernel, dense layers), "
                    "attention = SDPA / softmax kernels, elementwise = activations, adds, dropout, concatenation, "
                    "resampling, copies; other = Python and dispatch time between ops (the profiler's own overhead "
                    "inflates it and the small ops)")
    return table


if __name__ == "__main__":
    main()
