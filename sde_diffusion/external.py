"""Models from elsewhere: a diffusers ``UNet2DModel`` and its scheduler config as a ``prediction.Model`` on a path.

``from_unet(unet, scheduler_config)`` / ``load_diffusers(path)`` return a ``DiffusersModel`` with

* ``sde`` — ``discrete_vp.DiscreteVP`` through the scheduler's beta table (``linear``, ``scaled_linear``,
  ``squaredcos_cap_v2`` or ``trained_betas``), level i at t = (i + 1) / N with exactly abar_i;
* ``model`` — ``prediction.Model(fn, output, discrete=(sqrt(abar_i), sqrt(1 - abar_i)), model_time=...)`` with the
  output the scheduler's ``prediction_type`` declares (``epsilon`` -> eps, ``v_prediction`` -> v = sqrt(abar) eps -
  sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4), ``sample`` -> x0), and the network called at the timestep index
  i (0..N-1) of the level whose log-SNR equals the path's at t (``Model.fractional_index``).  At the nodes of the
  discrete schedules (``linspace`` / ``leading`` / ``trailing``, or a grid of level times ``level_times``) the index
  is an integer, as in diffusers' own schedulers (``model_time`` snaps indices within 1e-6 of an integer, float
  rounding of lambda -> t -> lambda); between levels the UNet gets the fractional timestep, which its sinusoidal
  embedding accepts (the network never saw it in training: use level grids for checkpoints trained on integers);
* ``shape`` — (C, H, W) of one sample (``in_channels``, ``sample_size``).

So every sampler of ``solvers`` runs on the model: ``solvers.sample(m.sde, m.model, (B, *m.shape), "ddim", 50,
schedule="leading")`` is diffusers' ``DDIMScheduler`` (eta = 0, ``timestep_spacing="leading"``, ``steps_offset=0``,
``set_alpha_to_one=True``, ``clip_sample=False``) on the same UNet.  Not carried over: sample clipping and dynamic
thresholding of the scheduler config (DPM-Solver's ``thresholding`` option does the latter), class conditioning
(``num_class_embeds``: refused) and Fourier-time (VE, ``score_sde_ve``) UNets (refused).  Learned variances: of a UNet
with 2C output channels the first C are the mean prediction; with ``variance_type`` learned_range the other C become
the model's learned variance (``Model(learned_variance=True)``, for the ancestral sampler's ``variance="learned"``),
with ``learned`` (a raw log-variance) they are ignored.

diffusers is imported only by ``load_diffusers`` (``pip install diffusers`` if it is missing); nothing is ever
downloaded: ``from_pretrained`` reads a local folder with ``local_files_only=True``.  Layouts read: a pipeline folder
(``model_index.json``, ``unet/``, ``scheduler/scheduler_config.json``) or a bare UNet folder (``config.json`` + weights)
with its ``scheduler_config.json`` next to it (``scheduler.save_pretrained(same folder)``), or ``scheduler_config``
given explicitly.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from .discrete_vp import BETA_SCHEDULES, DiscreteVP, beta_table
from .prediction import Model

Tensor = torch.Tensor

__all__ = ["DiffusersModel", "ExternalModelError", "from_unet", "load_diffusers", "scheduler_path",
           "PREDICTION_TYPES", "read_scheduler_config"]

#: diffusers' ``prediction_type`` -> our declared output (``prediction.OUTPUTS``)
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
#: an index this close to an integer is that integer (lambda -> t -> lambda round trip)
SNAP = 1e-6


class ExternalModelError(ValueError):
    """A model from elsewhere that cannot be used: missing files, an unsupported network or scheduler setting."""


class DiffusersModel(NamedTuple):
    sde: DiscreteVP                     #: the path through the scheduler's levels
    model: Model                        #: what solvers.sample takes
    shape: Tuple[int, int, int]         #: (C, H, W) of one sample
    unet: Any                           #: the diffusers module (eval mode, requires_grad off)
    scheduler_config: Dict[str, Any]    #: as read
    prediction_type: str                #: diffusers' name (epsilon, v_prediction, sample)

    def level_times(self, timesteps) -> Tensor:
        """Path times (float64) of diffusers timesteps (integer levels), e.g. a scheduler's ``timesteps``: a custom
        grid for ``solvers.sample(schedule=...)`` that calls the UNet at exactly those timesteps."""
        idx = torch.as_tensor(timesteps).to(torch.float64).flatten()
        return (idx + 1) / self.sde.N


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ExternalModelError(f"model.source=diffusers needs the diffusers package, which is not installed "
                                 f"(pip install diffusers): {e}") from None
    return diffusers


def read_scheduler_config(cfg: Union[str, Mapping[str, Any], Any]) -> Dict[str, Any]:
    """A scheduler config as a dict: a mapping, a scheduler object (its ``.config``) or a JSON file path."""
    if isinstance(cfg, str):
        try:
            with open(cfg, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExternalModelError(f"cannot read the scheduler config {cfg}: {e}") from None
    elif hasattr(cfg, "config") and not isinstance(cfg, Mapping):
        cfg = cfg.config
    if not isinstance(cfg, Mapping):
        raise ExternalModelError(f"a scheduler config must be a JSON object, got {type(cfg).__name__}")
    return dict(cfg)


def _chain(cfg: Dict[str, Any]) -> Tuple[DiscreteVP, str]:
    if cfg.get("rescale_betas_zero_snr", False):
        raise ExternalModelError("rescale_betas_zero_snr=True makes the last level pure noise (log-SNR -inf), where an "
                                 "eps / v model's x0 estimate is undefined on a VP path: not supported")
    schedule = str(cfg.get("beta_schedule", "linear"))
    trained = cfg.get("trained_betas")
    if trained is None and schedule not in BETA_SCHEDULES:
        raise ExternalModelError(f"unsupported beta_schedule {schedule!r}; supported: {', '.join(BETA_SCHEDULES)} "
                                 f"or trained_betas")
    try:
        betas = beta_table(schedule, int(cfg.get("num_train_timesteps", 1000)), float(cfg.get("beta_start", 1e-4)),
                           float(cfg.get("beta_end", 0.02)), trained)
    except (TypeError, ValueError) as e:
        raise ExternalModelError(f"the scheduler's beta table is unusable: {e}") from None
    pred = str(cfg.get("prediction_type", "epsilon"))
    if pred not in PREDICTION_TYPES:
        raise ExternalModelError(f"unsupported prediction_type {pred!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return DiscreteVP(betas, name="trained_betas" if trained is not None else schedule), pred


def _unet_config(unet) -> Dict[str, Any]:
    cfg = dict(getattr(unet, "config", {}) or {})
    if cfg.get("time_embedding_type", "positional") == "fourier":
        raise ExternalModelError("this UNet2DModel embeds the noise level with Fourier features (a VE / score_sde_ve "
                                 "model taking sigmas, not DDPM timesteps): not supported")
    if cfg.get("num_class_embeds") or cfg.get("class_embed_type"):
        raise ExternalModelError("class-conditional diffusers UNets (num_class_embeds / class_embed_type) are not "
                                 "supported yet: use an unconditional UNet2DModel")
    for key in ("in_channels", "sample_size"):
        if key not in cfg:
            raise ExternalModelError(f"the network's config has no {key!r}: not a diffusers UNet2DModel")
    return cfg


def _snap(idx: Tensor) -> Tensor:
    r = torch.round(idx)
    return torch.where((idx - r).abs() < SNAP, r, idx)


def from_unet(unet, scheduler_config, device=None, dtype: Optional[torch.dtype] = None) -> DiffusersModel:
    """Wrap a diffusers ``UNet2DModel`` (loaded or built in code) with its scheduler config (a dict, a scheduler or a
    JSON path) as our model (module doc).  ``device`` / ``dtype`` move the UNet (default: where it is)."""
    cfg = read_scheduler_config(scheduler_config)
    sde, pred = _chain(cfg)
    ucfg = _unet_config(unet)
    C, size = int(ucfg["in_channels"]), ucfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ExternalModelError(f"sample_size {size} is not (H, W)")
        H, W = int(size[0]), int(size[1])
    else:
        H = W = int(size)
    out_ch = int(ucfg.get("out_channels", C))
    if out_ch not in (C, 2 * C):
        raise ExternalModelError(f"the UNet outputs {out_ch} channels for {C} input channels: expected {C} (a mean "
                                 f"prediction) or {2 * C} (mean and learned variance)")
    if dtype is not None and next(unet.parameters()).dtype != dtype:
        unet = unet.to(dtype=dtype)
    if device is not None and next(unet.parameters()).device != torch.device(device):
        unet = unet.to(torch.device(device))
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    net_dtype = next(unet.parameters()).dtype

    # diffusers' learned_range: channels C..2C hold u in [-1, 1] with log Sigma = frac log beta + (1 - frac) log
    # beta-tilde, frac = (u + 1) / 2 (Nichol & Dhariwal 2021, eq. 15): our learned-variance v is that frac
    learned = out_ch == 2 * C and str(cfg.get("variance_type")) == "learned_range"

    def fn(x: Tensor, timestep: Tensor):
        out = unet(x.to(net_dtype), timestep).sample
        mean = out[:, :C].to(x.dtype)           # with 2C channels the first C are the mean prediction
        return (mean, (out[:, C:].to(x.dtype) + 1) / 2) if learned else mean

    a = torch.sqrt(sde.alphas_cumprod)
    s = torch.sqrt(-torch.expm1(-sde._B[1:]))   # sqrt(1 - abar_i) without cancellation
    kw = {"learned_variance": True} if learned else {}
    model = Model(fn, PREDICTION_TYPES[pred], discrete=(a, s), model_time=_snap, **kw)
    return DiffusersModel(sde, model, (C, H, W), unet, cfg, pred)


def scheduler_path(folder: str) -> Optional[str]:
    """The scheduler config of a diffusers folder: ``scheduler/scheduler_config.json`` (pipeline layout) or
    ``scheduler_config.json`` next to the UNet's files; None if there is none."""
    for cand in (os.path.join(folder, "scheduler", "scheduler_config.json"),
                 os.path.join(folder, "scheduler_config.json"),
                 os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json")):
        if os.path.isfile(cand):
            return cand
    return None


def load_diffusers(path: str, scheduler_config=None, device="cpu", dtype: torch.dtype = torch.float32
                   ) -> DiffusersModel:
    """``UNet2DModel.from_pretrained`` of a local folder (pipeline layout: its ``unet/`` subfolder) with its
    scheduler config (found in the folder unless given), wrapped by ``from_unet``."""
    if not path or not os.path.isdir(path):
        raise ExternalModelError(f"model.path {path!r} is not a folder (a diffusers pipeline or UNet2DModel folder "
                                 f"written by save_pretrained)")
    unet_dir = os.path.join(path, "unet") if os.path.isfile(os.path.join(path, "unet", "config.json")) else path
    cfg_file = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(cfg_file):
        raise ExternalModelError(f"{path} holds no UNet config (config.json or unet/config.json)")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cls = json.load(f).get("_class_name", "UNet2DModel")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ExternalModelError(f"cannot read {cfg_file}: {e}") from None
    if cls != "UNet2DModel":
        raise ExternalModelError(f"{cfg_file} describes a {cls}; only diffusers' UNet2DModel (unconditional "
                                 f"pixel-space DDPM/DDIM models) is supported")
    if scheduler_config is None:
        scheduler_config = scheduler_path(path)
        if scheduler_config is None:
            raise ExternalModelError(f"no scheduler config found for {path} (looked for scheduler/"
                                     f"scheduler_config.json and scheduler_config.json): the beta table and the "
                                     f"prediction type come from it")
    diffusers = _diffusers()
    try:
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir, local_files_only=True, torch_dtype=dtype)
    except Exception as e:   # noqa: BLE001 — whatever from_pretrained raises (missing weights, bad config), one line
        raise ExternalModelError(f"cannot load the UNet2DModel in {unet_dir}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return from_unet(unet, scheduler_config, device=device)
