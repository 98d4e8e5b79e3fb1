"""Our samplers against diffusers' schedulers and k-diffusion's samplers, side by side, on exact-score targets.

Every sampler sees the same problem: the VP SDE (linear beta 0.1 -> 20), float32, the same prior draw z ~ N(0, I)
(common random numbers), the exact score of an analytic target, and a grid ending at eps = 1e-5 (so that the error is
the solver's, not the grid's):

* ``gauss``: a 64-D Gaussian with an image-like spectrum (variances log-spaced 1e-4..1, randomly rotated;
  ``compare_solvers.gauss_target``); error = KL(N(sample mean, sample cov) || truth).
* ``ring``: eight Gaussians (std 0.1) on the unit circle (``compare_solvers.ring_target``); error = sliced W1 to exact
  draws, with the mode weights' total-variation error beside it.
A noise-floor row scores fresh exact samples the same way (mean of five draws).  Those sample metrics cannot tell two
samplers apart once both are near the floor (at 20 NFE the best peer is within 1.1-1.6x of it), so every deterministic
sampler is also scored without a floor, by its **flow-map error**: the whitened RMS distance
sqrt(E || Sigma^{-1/2} (x - x_ref) ||^2) between its sample and the exact probability-flow endpoint x_ref of the same
prior draw (Sigma: the target's covariance).  ``gauss``: x_ref in closed form (for N(0, Sigma) the flow from T to eps
scales each eigendirection by C_eps / C_T, C_t = sqrt(a_t^2 var + sigma_t^2), then Tweedie's jump E[x0 | x_eps]);
``ring``: x_ref from third-order UniPC on 800 log-SNR steps in float64 (its distance to 400 steps is printed: the
reference's own error).

Peers, each fed the exact model at its own noise levels:

* diffusers (``DPMSolverMultistepScheduler`` 2M / 3M / SDE-2M, ``UniPCMultistepScheduler``, ``HeunDiscreteScheduler``,
  ``EulerDiscreteScheduler`` with Karras sigmas; DPM-Solver++ 2M / 3M also on its log-SNR-uniform grid
  (``use_lu_lambdas``); ``DDIMScheduler`` with trailing spacing), clipping / thresholding off.
  They sample a discrete-time model: its eps at timestep k (fractional k: log-SNR interpolated between levels) is the
  exact eps at the noise level sqrt(1 - abar_k) of the table.  The table is the VP chain with ``--train-steps``
  levels (default 100 000, betas beta_min/N .. beta_max/N): with diffusers' usual N = 1000 its smallest noise level is
  sigma/a = 0.01, ten times our eps's 1e-3, and the 1e-4 variances of ``gauss`` would be lost to the grid, not to the
  solver; with N = 100 000 the table spans the same [eps, T] as ours.
* k-diffusion (``sample_euler``, ``sample_heun``, ``sample_lms``, ``sample_dpm_2``, ``sample_dpmpp_2m``,
  ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde`` on Karras sigmas, ``sample_dpm_adaptive`` over a tolerance ladder),
  fed the exact denoiser D(x, sigma) on the VE-normalised variable x / a with sigma = sigma(t)/a(t), sigma_min =
  that of eps, sigma_max that of T.  dpm_adaptive stops at sigma_min: one more call denoises (counted).
* ours: every method in ``solvers.available()`` with each of its variants on the ``edm`` and ``logsnr`` grids;
  adaptive ones (``fixed_steps`` false) over a tolerance ladder.  New samplers join automatically.  The multistep
  exponential integrators (DPM-Solver++ 2M / 3M, UniPC-2 / 3) also run on the ``optimized`` grid (fitted to each
  sampler and rung on 256 pilot draws of its own, not the benchmark's draw) at rungs up to ``--optimized-max-nfe``.

The NFE is counted, not assumed: each fixed-grid sampler (ours or a peer) takes the largest number of steps whose NFE
does not exceed the rung (5, 10, 20, 50, 100); an adaptive run counts at a rung when its NFE is within it.  The
summary gives, per rung, our best error, the best peer's, and their ratio (the aim: at most 1/2 at 10 and 20 NFE), for
the sample metric and for the flow-map error.

``python -m experiments.compare_peers [--quick] [--out DIR] [--targets gauss,ring] [--samples N] [--nfe 5,10,...]``
"""
from __future__ import annotations

import importlib.util
import math
import sys
import time
import types
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import solvers
from experiments._common import Checks, Report, Table, fmt, make_parser, parse_and_run, prepare_out, progress, pyplot
from experiments.compare_solvers import SamplerConfig, Target, gauss_target, ring_target, sampler_configs
from sde_diffusion import sdes

NAME = "compare_peers"
EPS = 1e-5
SCHEDULES = ("edm", "logsnr")
#: adaptive tolerances (rtol; atol = rtol / 6, the ratio of the Gotta-Go-Fast defaults 0.05 / 0.0078), loose first
TOLS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 1e-3, 3e-4, 1e-4)
#: our deterministic samplers that also run on the ``optimized`` grid (method, options to match)
OPTIMIZED = (("dpm_solver", {"order": 2, "variant": "multistep", "prediction": "x0"}),
             ("dpm_solver", {"order": 3, "variant": "multistep", "prediction": "x0"}),
             ("unipc", {"order": 2}), ("unipc", {"order": 3}))


# ================================================================================================ flow-map reference
def _mixture_cov(dist) -> torch.Tensor:
    w, mu = dist.weights.double(), dist.means.double()
    m = (w[:, None] * mu).sum(0)
    d = mu - m
    return (w[:, None, None] * (dist.covs.double() + d[:, :, None] * d[:, None, :])).sum(0)


class FlowReference:
    """The exact probability-flow endpoint of each prior draw and the whitened distance to it."""

    def __init__(self, target: Target, sde, score_fn, z: torch.Tensor):
        dist = target.dist
        cov = dist.cov.double() if hasattr(dist, "cov") else _mixture_cov(dist)
        var, self.Q = torch.linalg.eigh(cov)
        self.scale = var.sqrt()
        self.note = ""
        if hasattr(dist, "cov"):                    # Gaussian: closed form
            mean = dist.mean.double()
            a_T, s_T = (float(v) for v in sde.marginal_coeffs(torch.tensor(sde.T, dtype=torch.float64)))
            a_e, s_e = (float(v) for v in sde.marginal_coeffs(torch.tensor(EPS, dtype=torch.float64)))
            zq = (z.double() - a_T * mean) @ self.Q
            xe = ((a_e ** 2 * var + s_e ** 2).sqrt() / (a_T ** 2 * var + s_T ** 2).sqrt()) * zq     # x_eps - a_e mean
            x0q = a_e * var / (a_e ** 2 * var + s_e ** 2) * xe                                      # Tweedie
            self.ref = mean + x0q @ self.Q.T
            self.note = "closed form"
        else:
            def solve(steps):
                with torch.no_grad():
                    return solvers.sample(sde, score_fn, tuple(z.shape), "unipc", steps, x_init=z.double(), eps=EPS,
                                          schedule="logsnr", dtype=torch.float64, order=3).samples
            self.ref = solve(800)
            self.note = f"UniPC-3, 800 log-SNR steps, float64 (distance to 400 steps: {self(solve(400)):.2g})"

    def __call__(self, x) -> float:
        d = (x.double().reshape(self.ref.shape) - self.ref) @ self.Q / self.scale
        return float(d.pow(2).sum(1).mean().sqrt())


# ================================================================================================ peers: imports
def load_diffusers():
    """The diffusers scheduler classes, or None if diffusers is not importable."""
    try:
        import diffusers
        return diffusers
    except Exception:                                  # noqa: BLE001  (any import failure: not available)
        return None


def load_k_diffusion_sampling():
    """k-diffusion's ``sampling`` module alone (its package __init__ needs torchvision and image extras): loaded from
    its file with a minimal ``k_diffusion.utils`` (``append_dims``) and, if missing, a ``torchdiffeq`` stand-in (only
    its log-likelihood uses odeint).  None if k-diffusion is not installed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = next(iter(spec.submodule_search_locations)) + "/sampling.py"
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "torchdiffeq")}
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]
    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    if importlib.util.find_spec("torchdiffeq") is None:
        stub = types.ModuleType("torchdiffeq")

        def odeint(*a, **k):
            raise RuntimeError("torchdiffeq is not installed")
        stub.odeint = odeint
        sys.modules["torchdiffeq"] = stub
    try:
        mspec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        return mod
    except Exception:                                  # noqa: BLE001
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# ================================================================================================ exact models
class Counter:
    def __init__(self):
        self.n = 0


def k_denoiser(sde, score_fn, counter: Counter):
    """D(x, sigma) on the VE-normalised variable x_ve = x_vp / a, sigma = sigma_vp / a = e^{-lambda}: the exact
    E[x0 | x_t] at the t with lambda(t) = -log sigma (Tweedie: x0 = (x_vp + sigma_vp^2 score) / a)."""
    def D(x, sigma):
        counter.n += 1
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        t = sde.t_from_log_snr(-torch.log(sig))
        a, s = sde.marginal_coeffs(t)
        a = a.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        s = s.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        xv = a * x
        return (xv + s ** 2 * score_fn(xv, t.to(x.dtype))) / a
    return D


class DiscreteEps:
    """A discrete-time eps-model on diffusers' table: eps(x, k) = the exact eps at the noise level of level k
    (sqrt(1 - abar_k); fractional k: the log-SNR interpolated linearly between levels), fed the VP variable."""

    def __init__(self, sde, score_fn, alphas_cumprod: torch.Tensor, counter: Counter):
        ab = alphas_cumprod.double()
        self.lam = 0.5 * (torch.log(ab) - torch.log1p(-ab))            # lambda_k = log(sqrt(abar) / sqrt(1 - abar))
        self.sde, self.score_fn, self.counter = sde, score_fn, counter

    def __call__(self, x, k):
        self.counter.n += 1
        k = float(k)
        lo = min(int(math.floor(k)), self.lam.numel() - 2)
        w = k - lo
        lam = (1 - w) * self.lam[lo] + w * self.lam[lo + 1]
        t = self.sde.t_from_log_snr(lam).reshape(1)
        _, s = self.sde.marginal_coeffs(t)
        return -float(s) * self.score_fn(x, t.to(x.dtype).expand(x.shape[0]))      # eps = -sigma score


# ================================================================================================ peer configs
class Peer:
    """A peer sampler: ``run(n_steps_or_tol, z, gen) -> (x, nfe)``; fixed ones get per-step / offset measured."""

    def __init__(self, label: str, lib: str, fn: Callable, fixed: bool = True, stochastic: bool = False):
        self.label, self.lib, self.fn, self.fixed, self.stochastic = label, lib, fn, fixed, stochastic
        self.per_step: Optional[int] = None
        self.offset: Optional[int] = None

    def steps_for(self, nfe: int) -> int:
        """The most steps whose NFE (per_step * steps + offset) does not exceed ``nfe``."""
        return max(1, (nfe - self.offset) // self.per_step)


def diffusers_peers(diffusers, sde, score_fn, train_steps: int, only: Optional[Sequence[str]] = None) -> List[Peer]:
    N = int(train_steps)
    common = dict(num_train_timesteps=N, beta_start=sde.beta_0 / N, beta_end=sde.beta_1 / N, beta_schedule="linear",
                  prediction_type="epsilon")
    specs = {
        "diffusers DPM++2M (karras)": ("DPMSolverMultistepScheduler",
                                       dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
                                            thresholding=False), False),
        "diffusers DPM++3M (karras)": ("DPMSolverMultistepScheduler",
                                       dict(algorithm_type="dpmsolver++", solver_order=3, use_karras_sigmas=True,
                                            thresholding=False), False),
        # diffusers' own log-SNR-uniform grid (Lu et al.'s), the fair peer of our logsnr-grid samplers
        "diffusers DPM++2M (lu lambdas)": ("DPMSolverMultistepScheduler",
                                           dict(algorithm_type="dpmsolver++", solver_order=2, use_lu_lambdas=True,
                                                thresholding=False), False),
        "diffusers DPM++3M (lu lambdas)": ("DPMSolverMultistepScheduler",
                                           dict(algorithm_type="dpmsolver++", solver_order=3, use_lu_lambdas=True,
                                                thresholding=False), False),
        "diffusers SDE-DPM++2M (karras)": ("DPMSolverMultistepScheduler",
                                           dict(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                use_karras_sigmas=True, thresholding=False), True),
        "diffusers UniPC-bh2 (karras)": ("UniPCMultistepScheduler",
                                         dict(solver_order=2, solver_type="bh2", use_karras_sigmas=True,
                                              thresholding=False), False),
        "diffusers Heun (karras)": ("HeunDiscreteScheduler", dict(use_karras_sigmas=True), False),
        "diffusers Euler (karras)": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), False),
        "diffusers DDIM (trailing)": ("DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=False,
                                                            thresholding=False, set_alpha_to_one=True), False),
    }
    out = []
    for label, (cls_name, kw, stoch) in specs.items():
        if only is not None and label not in only:
            continue
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            continue

        def make(cls=cls, kw=kw):
            sched = cls(**common, **kw)
            counter = Counter()
            model = DiscreteEps(sde, score_fn, sched.alphas_cumprod, counter)

            def run(n, z, gen):
                sched.set_timesteps(int(n))
                counter.n = 0
                x = z * float(sched.init_noise_sigma)
                for k in sched.timesteps:
                    eps = model(sched.scale_model_input(x, k), k)
                    x = sched.step(eps, k, x, generator=gen).prev_sample if "generator" in \
                        _step_params(sched) else sched.step(eps, k, x).prev_sample
                return x, counter.n
            return run
        out.append(Peer(label, "diffusers", make(), stochastic=stoch))
    return out


def _step_params(sched):
    import inspect
    return inspect.signature(sched.step).parameters


def kdiff_peers(K, sde, score_fn, only: Optional[Sequence[str]] = None) -> List[Peer]:
    a_T, s_T = (float(v) for v in sde.marginal_coeffs(torch.tensor(sde.T, dtype=torch.float64)))
    a_e, s_e = (float(v) for v in sde.marginal_coeffs(torch.tensor(EPS, dtype=torch.float64)))
    sigma_max, sigma_min = s_T / a_T, s_e / a_e
    counter = Counter()
    D = k_denoiser(sde, score_fn, counter)
    specs = [("k-diff euler", "sample_euler", False), ("k-diff heun", "sample_heun", False),
             ("k-diff lms", "sample_lms", False), ("k-diff dpm_2", "sample_dpm_2", False),
             ("k-diff dpmpp_2m", "sample_dpmpp_2m", False), ("k-diff dpmpp_2m_sde", "sample_dpmpp_2m_sde", True),
             ("k-diff dpmpp_3m_sde", "sample_dpmpp_3m_sde", True)]
    out = []
    for label, fname, stoch in specs:
        fn = getattr(K, fname, None)
        if fn is None or (only is not None and label not in only):
            continue

        def run(n, z, gen, fn=fn):
            sigmas = K.get_sigmas_karras(int(n), sigma_min, sigma_max, rho=7.0).to(z.dtype)
            counter.n = 0
            x = z / a_T                              # the same prior draw, VE-normalised
            x = fn(D, x, sigmas, disable=True)
            return x, counter.n
        out.append(Peer(label, "k-diffusion", run, stochastic=stoch))
    if getattr(K, "sample_dpm_adaptive", None) is not None and (only is None or "k-diff dpm_adaptive" in only):
        def run_adaptive(tol, z, gen):
            counter.n = 0
            x = K.sample_dpm_adaptive(D, z / a_T, sigma_min, sigma_max, rtol=tol, atol=tol / 6, disable=True)
            x = D(x, torch.full((x.shape[0],), sigma_min, dtype=x.dtype))      # denoise at sigma_min: one call
            return x, counter.n
        out.append(Peer("k-diff dpm_adaptive", "k-diffusion", run_adaptive, fixed=False))
    return out


def measure_peer(peer: Peer, dim: int):
    """NFE per step and offset of a fixed-grid peer, measured on a tiny batch."""
    z = torch.randn(2, dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        n1 = peer.fn(12, z, torch.Generator().manual_seed(0))[1]
        n2 = peer.fn(13, z, torch.Generator().manual_seed(0))[1]
    peer.per_step, peer.offset = n2 - n1, n1 - 12 * (n2 - n1)


# ================================================================================================ running
def _finish(x, n):
    x = x.double().reshape(n, -1)
    return (x, "ok") if bool(torch.isfinite(x).all()) else (None, "diverged")


def run_peer(peer: Peer, arg, z, seed: int):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                          # k-diffusion's SDE samplers seed their Brownian tree from here
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            x, nfe = peer.fn(arg, z, gen)
    except Exception as e:                           # noqa: BLE001  (a peer's refusal is reported, not fatal)
        return None, None, time.perf_counter() - t0, f"failed: {type(e).__name__}: {str(e)[:60]}"
    wall = time.perf_counter() - t0
    x, status = _finish(x, z.shape[0])
    return x, nfe, wall, status


def run_ours(sde, score_fn, z, method, opts, steps, schedule, seed: int):
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            res = solvers.sample(sde, score_fn, tuple(z.shape), method, steps, generator=gen, eps=EPS,
                                 schedule=schedule, x_init=z, dtype=torch.float32, **opts)
    except (FloatingPointError, RuntimeError) as e:  # NonFiniteError; an adaptive run out of steps
        return None, None, time.perf_counter() - t0, f"diverged: {str(e)[:50]}"
    except ValueError as e:
        return None, None, time.perf_counter() - t0, f"n/a: {str(e)[:60]}"
    wall = time.perf_counter() - t0
    x, status = _finish(res.samples, z.shape[0])
    return x, res.nfe, wall, status


TOL_OPTIONS = {"rtol", "atol", "eps_rel", "eps_abs"}


def adaptive_options(method: str, tol: float) -> Optional[Dict]:
    opts = solvers.get_sampler(method).options
    if "rtol" in opts:
        return {"rtol": tol, "atol": tol / 6}
    if "eps_rel" in opts:
        return {"eps_rel": tol, "eps_abs": tol / 6}
    return None


COLUMNS = ["family", "sampler", "schedule", "steps / tol", "NFE target", "NFE used", "error", "flow-map error",
           "extra", "wall s", "status"]


def _stochastic(cfg) -> bool:
    if isinstance(cfg, Peer):
        return cfg.stochastic
    return solvers.get_sampler(cfg.method).stochastic(cfg.options)


def _optimized_for(cfg: SamplerConfig) -> bool:
    return cfg.fixed and any(cfg.method == m and all(cfg.options.get(k, v) == v for k, v in o.items())
                             and all(k in o for k in cfg.options) for m, o in OPTIMIZED)


def study(target: Target, sde, ladder, n: int, seed: int, table: Table, show: bool, quick: bool,
          our_configs, peers: List[Peer], optimized_max_nfe: int = 20, fit: Optional[Dict] = None):
    score_fn = target.dist.score_fn(sde)
    floors, fx = [], {}
    for k in range(5):
        xf = target.dist.sample(n, torch.Generator().manual_seed(3000 + 10 * seed + k))
        floors.append(target.error_fn(xf))
        if k == 0 and target.extras:
            fx = target.extras(xf)
    floor = float(np.mean(floors))
    table.add(family="-", sampler="noise floor: fresh exact samples (mean of 5 draws)", error=floor,
              extra=_extra(fx), status=f"ok (draws {min(floors):.3g}..{max(floors):.3g})")
    z = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(seed * 100003 + 17))   # one prior draw
    run_seed = seed * 7 + 3
    records = []
    flow = FlowReference(target, sde, score_fn, z)
    table.add(family="-", sampler=f"flow-map reference: {flow.note}", status="ok")

    def record(family, label, schedule, arg, N, x, nfe, wall, status, fixed, deterministic=False):
        err = target.error_fn(x) if x is not None else math.inf
        ferr = (flow(x) if x is not None else math.inf) if deterministic else None
        ex = target.extras(x) if (x is not None and target.extras) else {}
        table.add(family=family, sampler=label, schedule=schedule, **{"steps / tol": arg, "NFE target": N,
                                                                      "NFE used": nfe}, error=err,
                  **{"flow-map error": ferr}, extra=_extra(ex), **{"wall s": wall}, status=status)
        records.append(dict(family=family, sampler=label, schedule=schedule, arg=arg, nfe_target=N, nfe=nfe,
                            error=err, flow_error=ferr, status=status, fixed=fixed))

    top = max(ladder)
    adaptive_seen = set()
    jobs = []
    for c in our_configs:
        if c.fixed:
            jobs += [("ours", c, s) for s in SCHEDULES]
            if _optimized_for(c) and optimized_max_nfe >= min(ladder):
                jobs.append(("ours", c, "optimized"))
            continue
        # the tolerance ladder replaces a variant's tolerances; its other options (e.g. order) still count
        key = (c.method, tuple(sorted((k, v) for k, v in c.options.items() if k not in TOL_OPTIONS)))
        if key not in adaptive_seen:
            adaptive_seen.add(key)
            jobs.append(("ours", c, "adaptive"))
    jobs += [("peer", p, None) for p in peers]
    for family, cfg, schedule in progress(jobs, target.name, show):
        if family == "ours":
            det = not _stochastic(cfg)
            if cfg.fixed:
                for N in ladder:
                    if schedule == "optimized" and N > optimized_max_nfe:
                        continue
                    steps = max(1, (N - cfg.offset) // cfg.per_step)
                    opts = dict(cfg.options, **(fit or {})) if schedule == "optimized" else cfg.options
                    out = run_ours(sde, score_fn, z, cfg.method, opts, steps, schedule, run_seed)
                    record("ours", cfg.label, schedule, steps, N, *out, fixed=True, deterministic=det)
            else:
                rest = {k: v for k, v in cfg.options.items() if k not in TOL_OPTIONS}
                label = cfg.method + (f"[{', '.join(f'{k}={v}' for k, v in rest.items())}]" if rest else "")
                for tol in TOLS:
                    opts = adaptive_options(cfg.method, tol)
                    if opts is None:
                        break
                    out = run_ours(sde, score_fn, z, cfg.method, dict(rest, **opts), 1, "uniform", run_seed)
                    record("ours", label, "adaptive", tol, None, *out, fixed=False, deterministic=det)
                    if out[1] is not None and out[1] > 1.5 * top:
                        break
        else:
            det = not _stochastic(cfg)
            if cfg.fixed:
                for N in ladder:
                    steps = cfg.steps_for(N)
                    out = run_peer(cfg, steps, z, run_seed)
                    record(cfg.lib, cfg.label, "karras" if "karras" in cfg.label or cfg.lib == "k-diffusion"
                           else "own", steps, N, *out, fixed=True, deterministic=det)
            else:
                for tol in TOLS:
                    out = run_peer(cfg, tol, z, run_seed)
                    record(cfg.lib, cfg.label, "adaptive", tol, None, *out, fixed=False, deterministic=det)
                    if out[1] is not None and out[1] > 1.5 * top:
                        break
    return records, floor


def _extra(ex: Dict) -> str:
    return ", ".join(f"{k}: {fmt(v)}" for k, v in ex.items())


def best_at(records, N, ours: bool, key: str = "error"):
    """The best finite ``key`` (error or flow_error) with NFE <= N (fixed-grid rungs and adaptive runs alike)."""
    rs = [r for r in records if (r["family"] == "ours") == ours and r["nfe"] is not None and r["nfe"] <= N
          and r.get(key) is not None and math.isfinite(r[key])]
    return min(rs, key=lambda r: r[key]) if rs else None


def summary_table(target: Target, records, floor, ladder) -> Table:
    tab = Table(f"summary_{target.name}", ["NFE", "best of ours", "our error", "best peer", "peer error",
                                           "ours / peer", "ours / floor"],
                title=f"{target.name}: best error at NFE <= rung ({target.error_name}; noise floor {fmt(floor)})")
    for N in ladder:
        o, p = best_at(records, N, True), best_at(records, N, False)
        tab.add(NFE=N, **{"best of ours": _who(o), "our error": o["error"] if o else None,
                          "best peer": _who(p), "peer error": p["error"] if p else None,
                          "ours / peer": (o["error"] / p["error"]) if (o and p and p["error"] > 0) else None,
                          "ours / floor": (o["error"] / floor) if o else None})
    return tab


def flow_summary_table(target: Target, records, ladder) -> Table:
    tab = Table(f"flow_summary_{target.name}", ["NFE", "best of ours", "our flow-map error", "best peer",
                                                "peer flow-map error", "ours / peer"],
                title=f"{target.name}: best flow-map error at NFE <= rung (deterministic samplers; no noise floor)")
    for N in ladder:
        o, p = best_at(records, N, True, "flow_error"), best_at(records, N, False, "flow_error")
        tab.add(NFE=N, **{"best of ours": _who(o), "our flow-map error": o["flow_error"] if o else None,
                          "best peer": _who(p), "peer flow-map error": p["flow_error"] if p else None,
                          "ours / peer": (o["flow_error"] / p["flow_error"]) if (o and p and p["flow_error"] > 0)
                          else None})
    return tab


def _who(r) -> str:
    if r is None:
        return "-"
    return f"{r['sampler']} ({r['schedule']}, NFE {r['nfe']})"


def plot(plt, report: Report, target: Target, records, floor):
    fig, ax = plt.subplots(figsize=(9, 6))
    lines = {}
    for r in records:
        if r["nfe"] is None or not math.isfinite(r["error"]):
            continue
        key = (r["family"], r["sampler"] + ("" if r["schedule"] in ("adaptive", "karras", "own")
                                             else f" ({r['schedule']})"))
        lines.setdefault(key, []).append((r["nfe"], r["error"]))
    cmap = plt.get_cmap("tab20")
    for i, ((family, label), pts) in enumerate(sorted(lines.items())):
        pts.sort()
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], "-" if family == "ours" else "--",
                  marker="o" if family == "ours" else "x", ms=3, lw=1, color=cmap(i % 20),
                  label=label if family == "ours" else f"[{family}] {label}")
    ax.axhline(floor, color="k", ls=":", lw=1, label="noise floor")
    ax.set_xlim(3, 300)
    ax.set_xlabel("NFE (network calls)")
    ax.set_ylabel(target.error_name)
    ax.set_title(f"{target.name}: ours solid, peers dashed", fontsize=10)
    ax.legend(fontsize=5, ncol=2, loc="lower left")
    report.figure(fig, f"error_vs_nfe_{target.name}", f"{target.name}: error vs NFE (ours solid, peers dashed)")


#: the lines of the summary figure: (family, sampler, schedule) -> legend label
HIGHLIGHT = {
    ("ours", "dpm_solver[order=2, variant=multistep]", "logsnr"): "ours DPM-Solver++ 2M, log-SNR grid",
    ("ours", "dpm_solver[order=2, variant=multistep]", "optimized"): "ours DPM-Solver++ 2M, optimized grid",
    ("ours", "unipc[order=3]", "logsnr"): "ours UniPC-3, log-SNR grid",
    ("ours", "unipc[order=3]", "optimized"): "ours UniPC-3, optimized grid",
    ("diffusers", "diffusers DPM++2M (lu lambdas)", "own"): "diffusers DPM++ 2M, log-SNR grid",
    ("diffusers", "diffusers DPM++3M (lu lambdas)", "own"): "diffusers DPM++ 3M, log-SNR grid",
    ("k-diffusion", "k-diff dpmpp_2m", "karras"): "k-diffusion dpmpp_2m, Karras grid",
    ("k-diffusion", "k-diff lms", "karras"): "k-diffusion lms, Karras grid",
}


def plot_summary(plt, report: Report, target: Target, records, floor, ladder):
    """Two panels: the sample metric (best of ours vs best peer at each rung, and the noise floor) and the floor-free
    flow-map error of a few representative samplers from each library."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ours, style, label in ((True, "o-", "best of ours"), (False, "x--", "best peer")):
        for key, ax in (("error", ax1), ("flow_error", ax2)):
            pts = [(N, best_at(records, N, ours, key)) for N in ladder]
            pts = [(N, r[key]) for N, r in pts if r is not None and r[key] > 0]
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, color="k" if ours else "grey", lw=2,
                      label=label, zorder=3)
    ax1.axhline(floor, color="k", ls=":", lw=1, label="noise floor (fresh exact samples)")
    cmap = plt.get_cmap("tab10")
    for i, (key, label) in enumerate(HIGHLIGHT.items()):
        pts = sorted((r["nfe"], r["flow_error"]) for r in records
                     if (r["family"], r["sampler"], r["schedule"]) == key and r["nfe"] is not None
                     and r.get("flow_error") is not None and math.isfinite(r["flow_error"]) and r["flow_error"] > 0)
        if pts:
            ax2.loglog([p[0] for p in pts], [p[1] for p in pts], "-" if key[0] == "ours" else "--", lw=1,
                       marker="o" if key[0] == "ours" else "x", ms=3, color=cmap(i % 10), label=label)
    ax1.set(xlabel="NFE", ylabel=target.error_name, title=f"{target.name}: sample metric")
    ax2.set(xlabel="NFE", ylabel="whitened RMS distance to the exact flow endpoint",
            title=f"{target.name}: flow-map error (no floor)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=6, loc="lower left")
    report.figure(fig, f"summary_{target.name}", f"{target.name}: best of ours vs best peer; flow-map error")


# ================================================================================================ main
def main(argv: Optional[Sequence[str]] = None):
    p = make_parser(NAME, __doc__.split("\n")[0])
    p.add_argument("--targets", default="gauss,ring", help="comma-separated targets")
    p.add_argument("--nfe", default=None, help="comma-separated NFE rungs (default 5,10,20,50,100; quick 10,20)")
    p.add_argument("--samples", type=int, default=None, help="samples per run (default 10000, which fits the run in ~15-25 min on 2 busy cores; quick 400)")
    p.add_argument("--dim", type=int, default=None, help="dimension of the Gaussian (default 64; quick 16)")
    p.add_argument("--train-steps", type=int, default=100_000,
                   help="levels of the discrete table diffusers' schedulers sample (see the module doc)")
    p.add_argument("--optimized-max-nfe", type=int, default=20,
                   help="largest rung at which our multistep samplers also run on the fitted 'optimized' grid "
                        "(0: never; the fit costs ~60 sampler runs per node on 256 pilot draws)")
    return parse_and_run(p, run, argv)


QUICK_OURS = ("dpm_solver", "unipc", "ddim")
QUICK_PEERS = ("diffusers DPM++2M (karras)", "k-diff dpmpp_2m", "k-diff euler")


def run(args):
    quick = args.quick
    out = prepare_out(args.out)
    plt = pyplot()
    show = not args.no_progress
    report = Report(out, "Our samplers against diffusers and k-diffusion" + (" (quick)" if quick else ""))
    check = Checks(quick)
    ladder = [int(v) for v in args.nfe.split(",")] if args.nfe else ([10, 20] if quick else [5, 10, 20, 50, 100])
    n = args.samples or (400 if quick else 10_000)
    dim = args.dim or (16 if quick else 64)
    sde = sdes.VPSDE(0.1, 20.0)

    configs = sampler_configs(sde)
    if quick:
        configs = [c for c in configs if c.method in QUICK_OURS and c.options.get("order", 2) == 2
                   and c.options.get("variant", "multistep") == "multistep" and c.options.get("eta", 0) == 0
                   and c.options.get("prediction", "x0") == "x0"]
    diffusers, K = load_diffusers(), load_k_diffusion_sampling()
    report.note(f"SDE: {sde!r}; eps = {EPS}; float32; {n} samples per run; NFE rungs {ladder}; our schedules "
                f"{list(SCHEDULES)}; adaptive tolerances from {TOLS[0]} down; diffusers table of {args.train_steps} "
                f"levels; diffusers {'%s' % diffusers.__version__ if diffusers else 'not importable'}, k-diffusion "
                f"{'loaded' if K is not None else 'not importable'}; torch threads {torch.get_num_threads()}.")
    names = [s for s in args.targets.split(",") if s]
    builders = {"gauss": lambda: gauss_target(dim, args.seed), "ring": lambda: ring_target(args.seed, n)}
    results = {}
    for name in names:
        target = builders[name]()
        target.eps = EPS
        score_fn = target.dist.score_fn(sde)
        only = QUICK_PEERS if quick else None
        peers = (diffusers_peers(diffusers, sde, score_fn, args.train_steps, only) if diffusers else []) + \
                (kdiff_peers(K, sde, score_fn, only) if K is not None else [])
        for peer in peers:
            if peer.fixed:
                measure_peer(peer, target.dim)
        tab = Table(f"results_{name}", COLUMNS, title=f"{name}: {target.description}; error = {target.error_name}")
        t0 = time.perf_counter()
        fit = {"pilot_samples": 64, "max_evals": 100} if quick else None
        records, floor = study(target, sde, ladder, n, args.seed, tab, show, quick,
                               [c for c in configs if not quick or c.method != "unipc"], peers,
                               min(args.optimized_max_nfe, 10) if quick else args.optimized_max_nfe, fit)
        summary = summary_table(target, records, floor, ladder)
        flow_summary = flow_summary_table(target, records, ladder)
        report.table(summary)
        report.table(flow_summary)
        report.table(tab)
        report.note(f"_{name}: {time.perf_counter() - t0:.1f} s_")
        plot(plt, report, target, records, floor)
        plot_summary(plt, report, target, records, floor, ladder)
        results[name] = dict(records=records, floor=floor, summary=summary.rows, flow_summary=flow_summary.rows)
        ok = [r for r in records if r["status"] == "ok"]
        check(len(ok) >= 0.8 * len(records), f"{name}: {len(ok)} of {len(records)} runs finished")
        for N in ladder:
            row = next(r for r in summary.rows if r["NFE"] == N)
            ratio = row["ours / peer"]
            check(ratio is not None and ratio <= 0.5,
                  f"{name}: at NFE {N} our best error is at most half the best peer's (ratio {fmt(ratio)})",
                  strict=False)
            frow = next(r for r in flow_summary.rows if r["NFE"] == N)
            fratio = frow["ours / peer"]
            check(fratio is not None and fratio <= 0.5,
                  f"{name}: at NFE {N} our best flow-map error is at most half the best peer's (ratio {fmt(fratio)})",
                  strict=False)
        # the same algorithm on the same grid should give the same error: DPM-Solver++(2M) ours vs k-diffusion's
        ours2m = [r for r in records if r["sampler"].startswith("dpm_solver[order=2, variant=multistep")
                  and "prediction" not in r["sampler"] and r["schedule"] == "edm"]
        k2m = [r for r in records if r["sampler"] == "k-diff dpmpp_2m"]
        for N in ladder:
            a = [r for r in ours2m if r["nfe_target"] == N]
            b = [r for r in k2m if r["nfe_target"] == N]
            if a and b and a[0]["nfe"] == b[0]["nfe"] and math.isfinite(a[0]["error"]) and b[0]["error"] > 0:
                ratio = a[0]["error"] / b[0]["error"]
                check(0.5 < ratio < 2.0, f"{name}: DPM++(2M) at NFE {a[0]['nfe']} on the Karras grid: ours "
                                         f"{fmt(a[0]['error'])} vs k-diffusion {fmt(b[0]['error'])} (same algorithm, "
                                         f"same grid: ratio {ratio:.3g} within 2x)")
    check.finish(report)
    return results


if __name__ == "__main__":
    main()
