"""Sampling to disk: EMA weights + the sampler the config names -> ``samples.npz`` and a PNG grid; controllable
generation (class labels, classifier-free and classifier guidance, inpainting, colourisation) through
``config.sampling``.

``sample(config, workdir, checkpoint=None, device=None)`` writes ``<workdir>/samples/step_<step>[_<tag>]/samples.npz``
(key ``samples``: float32 in data space — images (N, C, H, W) in [0, 1], toy points (N, D); ``labels`` for
class-conditional or guided samples; ``nfe``, ``step``; for inpainting / colourisation also ``original``, ``masked``
(the input as the model sees it: missing pixels at 0.5 / the grey image) and, for inpainting, ``mask`` (1 = filled
in by the model))
and ``samples.png`` next to it.  The tag names the task and guidance (e.g. ``cfg_w2_y3``, ``inpaint_idx5_right_half``)
so that runs with different settings do not overwrite each other.

``config.sampling`` keys for controllable generation:

* ``class_label``: -1 cycles through the classes (sample i gets label i mod K; inpainting / colourisation: no label,
  the unconditional completion); 0 <= y < K asks for class y; K (the null label) gives the unconditional score of a
  conditional model (without guidance only).
* ``guidance``: ``none`` (a conditional model uses s(x, y) as it is); ``cfg``: s(x) + w (s(x, y) - s(x)) for a
  class-conditional model trained with label dropout (``guidance.cfg_score_batched``: one network call on the doubled
  batch); ``classifier``: s(x) + scale grad_x log p(y | x_t, t) with the time-dependent classifier trained in
  ``classifier_workdir`` (``--mode train_classifier``; its SDE and data scaling must be the score model's); on a
  conditional model s(x) is its null-label score.  ``guidance_scale`` is w / scale.
* ``task``: ``generate`` | ``inpaint`` | ``colorize``, given ``image`` (a .npy array or an image file, values in
  [0, 1] or 0..255, shape (H, W), (C, H, W) or (H, W, C) of the model's size) or ``dataset_index`` (an image of the
  test split).  ``mask`` (inpaint) marks the pixels to **fill in**: ``right_half``, ``left_half``, ``top_half``,
  ``bottom_half``, ``center`` (the middle square of half the side) or a file (.npy of 0/1, or an image: white =
  fill in, thresholded at 0.5) of shape (H, W), (1, H, W) or (C, H, W).  Colourisation observes the grey image
  (channel mean) of a colour image, or a one-channel image as given; it needs 3-channel data.

Inpainting and colourisation (``sde_diffusion.inpainting``) combine the replacement constraint (the known
coordinates are re-imposed, forward-noised, after every step: Song et al. 2021, App. I) with the Tweedie conditional
score (``covariance="isotropic"``: one vector-Jacobian product per score evaluation), and paste the known pixels into
the final samples exactly.  They work with every fixed-grid sampler that supports a constraint (not with adaptive ones such as ``rk45``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
from typing import Optional

import numpy as np
import torch
from absl import logging

import solvers

from ..atomic import atomic_path
from ..autoencoder import is_latent
from ..data import get_data_inverse_scaler, get_data_scaler, get_dataset, mix_seed
from ..guidance import cfg_score_batched, classifier_score
from ..inpainting import Colorize, Inpaint
from ..networks import get_model, get_score_fn
from ..networks.utils import autocast_network
from ..prediction import Model, as_model
from . import distributed
from .checkpoints import atomic_write_text, load_model
from .utils import get_device, plot_points, save_image_grid

Tensor = torch.Tensor

__all__ = ["data_shape", "sampler_options", "generate", "generate_sharded", "save_samples", "sample", "load_sampling_model",
           "MODEL_SOURCES", "SamplingError", "GUIDANCE",
           "TASKS", "MASKS", "sampling_labels", "guided_score_fn", "load_guidance_classifier", "load_condition",
           "make_mask", "class_rows", "output_tag", "DATA_VAR"]

GUIDANCE = ("none", "cfg", "classifier")
TASKS = ("generate", "inpaint", "colorize")
MASKS = ("right_half", "left_half", "top_half", "bottom_half", "center")
#: default ``sampling.inpaint_data_var``: variance per pixel of centred image data, for the isotropic Tweedie
#: covariance of the conditional score (digits in [-1, 1]: 0.29 per pixel about the pixel means, 0.57 overall;
#: CIFAR-10: about 0.25)
DATA_VAR = 0.5


class SamplingError(ValueError):
    """A sampling request that cannot be served: bad label, guidance, task, image or mask."""


def data_shape(config):
    """Shape of one example in model space: (C, H, W) for images, (D,) for toy data."""
    if config.data.dataset.lower() == "toy":
        return (int(config.data.dim),)
    return (int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))


#: the wave-1 samplers' options kept as flat keys of ``config.sampling`` (each passed to its own sampler only: names
#: such as ``corrector`` mean different things to different samplers); every other option goes in sampling.options
FLAT_OPTIONS = {"pc": ("predictor", "corrector", "snr", "n_corrector_steps"), "ode": ("solver",),
                "rk45": ("rtol", "atol"), "ancestral": ("variance",), "ddim": ("eta",)}


def sampler_options(config, method: Optional[str] = None) -> dict:
    """The options to pass to the method: ``config.sampling.options`` (its own and its schedule's options, checked:
    an unknown one is a ``SamplingError`` naming what is accepted), over the flat wave-1 keys of ``config.sampling``
    that belong to the method (``FLAT_OPTIONS``, e.g. ``snr`` for ``pc``)."""
    method = method or config.sampling.method
    info = solvers.get_sampler(method)
    accepted = info.options
    out = {k: config.sampling[k] for k in FLAT_OPTIONS.get(method, ()) if k in config.sampling and k in accepted}
    given = dict(config.sampling.get("options", None) or {})
    schedule = str(config.sampling.schedule)
    allowed = set(accepted) | set(solvers.schedule_options(schedule))
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise SamplingError(f"sampling.options {unknown} not accepted by method {method!r} "
                            f"(options: {', '.join(accepted) or 'none'}) nor by schedule {schedule!r} "
                            f"(options: {', '.join(sorted(allowed - set(accepted))) or 'none'})")
    out.update(given)
    return out


# ------------------------------------------------------------------------------------------------ labels, guidance
def _guidance(config) -> str:
    g = str(config.sampling.guidance).lower()
    if g not in GUIDANCE:
        raise SamplingError(f"unknown sampling.guidance {config.sampling.guidance!r}; available: {', '.join(GUIDANCE)}")
    return g


def _task(config) -> str:
    task = str(config.sampling.task).lower()
    if task not in TASKS:
        raise SamplingError(f"unknown sampling.task {config.sampling.task!r}; available: {', '.join(TASKS)}")
    return task


def check_guidance(config, classifier_classes: Optional[int] = None, warn: bool = True) -> None:
    """Raise ``SamplingError`` for a guidance / label request the model cannot serve (before anything is loaded)."""
    g, task = _guidance(config), _task(config)
    k_model = int(config.model.num_classes)
    scale = float(config.sampling.guidance_scale)
    if not math.isfinite(scale) or scale < 0:
        raise SamplingError(f"sampling.guidance_scale must be a finite number >= 0, got {scale}")
    if g == "cfg" and k_model <= 0:
        raise SamplingError("classifier-free guidance (sampling.guidance=cfg) needs a class-conditional model "
                            "trained with label dropout (model.num_classes > 0, training.p_uncond > 0, e.g. the "
                            "vp_digits_cond config); this model is unconditional: use sampling.guidance=classifier "
                            "with sampling.classifier_workdir, or sampling.guidance=none")
    if g == "classifier" and not config.sampling.classifier_workdir:
        raise SamplingError("sampling.guidance=classifier needs sampling.classifier_workdir, the workdir of a "
                            "classifier trained with --mode train_classifier (e.g. --config digits_classifier)")
    label = int(config.sampling.class_label)
    k = classifier_classes if g == "classifier" else k_model
    if label < -1:
        raise SamplingError(f"sampling.class_label must be -1 (cycle through the classes) or a class index, "
                            f"got {label}")
    if label >= 0 and (k is not None and k <= 0):
        raise SamplingError(f"sampling.class_label={label} needs a class-conditional model (model.num_classes > 0) "
                            f"or classifier guidance (sampling.guidance=classifier); this model is unconditional")
    if k is not None and k > 0 and label >= k:
        null_ok = g == "none" and label == k
        if not null_ok:
            what = "the classifier has" if g == "classifier" else "the model has"
            raise SamplingError(f"sampling.class_label={label} is out of range: {what} {k} classes (0..{k - 1}; "
                                f"{k} = the null label, allowed only with sampling.guidance=none)")
    if warn and task != "generate" and label == -1 and g != "none":
        logging.warning("%s with class_label=-1: the unconditional completion, guidance %s not applied", task, g)


def sampling_labels(config, n: int, num_classes: int) -> Optional[Tensor]:
    """Labels (n,) for the samples, or None (unconditional): -1 cycles through the classes for generation and means
    no label for inpainting / colourisation; else the given label for every sample."""
    if num_classes <= 0:
        return None
    label = int(config.sampling.class_label)
    if label < 0:
        return torch.arange(n) % num_classes if _task(config) == "generate" else None
    return torch.full((n,), label, dtype=torch.long)


def _num_label_classes(config, classifier) -> int:
    if _guidance(config) == "classifier":
        return int(classifier[1].num_classes)
    return int(config.model.num_classes)


def guided_score_fn(config, sde, model, y: Optional[Tensor], classifier=None):
    """The ``score_fn(x, t)`` the config asks for, for labels ``y`` (B,) or None (unconditional; the null label of a
    conditional model).  ``classifier = (classifier_sde, classifier_model)`` for ``guidance=classifier``."""
    g = _guidance(config)
    if isinstance(model, Model):          # a model from elsewhere (model.source = diffusers): unconditional only
        if y is not None and g != "none":
            raise SamplingError(f"sampling.guidance={g} needs one of our class-conditional networks; a model loaded "
                                f"with model.source={config.model.get('source', 'diffusers')} is unconditional")
        return model
    if y is None or g == "none":
        return get_model(sde, model, train=False, y=y)
    w = float(config.sampling.guidance_scale)
    if g == "cfg":
        def label_score_fn(x, t, labels):
            return get_score_fn(sde, model, train=False, y=labels)(x, t)
        return cfg_score_batched(label_score_fn, y, null_label=int(config.model.num_classes), w=w)
    from ..classifier import log_p_y_fn
    clf_sde, clf_model = classifier
    return classifier_score(get_score_fn(sde, model, train=False, y=None), log_p_y_fn(clf_model, clf_sde), y, w)


def load_guidance_classifier(config, sde, device="cpu"):
    """``(classifier_sde, classifier_model)`` from ``sampling.classifier_workdir``, checked against the score model:
    the same SDE (marginals at every t) and the same data shape and scaling."""
    from .classifier_train import load_classifier
    ccfg, csde, cmodel = load_classifier(config.sampling.classifier_workdir, device=device)
    where = config.sampling.classifier_workdir
    ts = torch.linspace(0.0, 1.0, 11, dtype=torch.float64) * sde.T
    same_sde = type(csde) is type(sde) and csde.T == sde.T and all(
        torch.allclose(torch.as_tensor(u, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64), rtol=1e-6,
                       atol=1e-9) for u, v in zip(csde.marginal_coeffs(ts), sde.marginal_coeffs(ts)))
    if not same_sde:
        raise SamplingError(f"the classifier in {where} was trained on the {csde} but the score model diffuses with "
                            f"the {sde}: train the classifier with the score model's SDE settings")
    if data_shape(ccfg) != data_shape(config) or bool(ccfg.data.centered) != bool(config.data.centered):
        raise SamplingError(f"the classifier in {where} takes data of shape {data_shape(ccfg)} (centered="
                            f"{ccfg.data.centered}) but the model generates {data_shape(config)} (centered="
                            f"{config.data.centered})")
    return csde, cmodel


# ------------------------------------------------------------------------------------------------ inpaint / colourise
def _to_chw(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        if arr.shape[0] in (1, 3):
            return arr
        if arr.shape[-1] in (1, 3, 4):
            return np.moveaxis(arr[..., :3] if arr.shape[-1] == 4 else arr, -1, 0)
    raise SamplingError(f"{what} must have shape (H, W), (C, H, W) or (H, W, C) with C = 1 or 3, got {arr.shape}")


def _read_array(path: str, what: str, mode: Optional[str] = None) -> np.ndarray:
    if not os.path.isfile(path):
        raise SamplingError(f"{what} file {path!r} does not exist")
    if path.lower().endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SamplingError(f"cannot read {what} {path!r}: {e}") from e
        if arr.dtype == np.uint8:
            return arr.astype(np.float32) / 255.0
        if arr.dtype == bool:
            return arr.astype(np.float32)
        if not np.issubdtype(arr.dtype, np.number):
            raise SamplingError(f"{what} {path!r} holds {arr.dtype} values, not numbers")
        return arr.astype(np.float32)
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = img.convert(mode or ("L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"))
            return np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise SamplingError(f"cannot read {what} {path!r} as an image (.npy, .png, ...): {e}") from e


def load_condition(config) -> dict:
    """The image to inpaint / colourise, in data space: ``dict(image=(C, H, W) float32 in [0, 1], label=int or None,
    source=str)``, from ``sampling.image`` or the test split's ``sampling.dataset_index``."""
    task = _task(config)
    if config.data.dataset.lower() == "toy":
        raise SamplingError(f"sampling.task={task} needs image data; {config.name} generates toy points")
    C, H, W = data_shape(config)
    if task == "colorize" and C != 3:
        raise SamplingError(f"colourisation needs 3-channel (colour) data; {config.data.dataset} has {C} channel"
                            f"{'s' if C != 1 else ''} (digits are greyscale): use sampling.task=inpaint")
    path, index = str(config.sampling.image), int(config.sampling.dataset_index)
    if path and index >= 0:
        raise SamplingError("give either sampling.image or sampling.dataset_index, not both")
    if not path and index < 0:
        raise SamplingError(f"sampling.task={task} needs an image: --config.sampling.image=PATH or "
                            f"--config.sampling.dataset_index=N (an image of the {config.data.dataset} test split)")
    label = None
    if path:
        image = _to_chw(_read_array(path, "image"), f"image {path!r}")
        source = path
        if image.min() < 0 or image.max() > 1:
            raise SamplingError(f"image {path!r} has values in [{image.min():.3g}, {image.max():.3g}]; expected [0, 1] "
                                f"(floats) or 0..255 (uint8 / image files)")
        image = torch.from_numpy(np.ascontiguousarray(image))
    else:
        test = get_dataset(config, "test")
        if index >= len(test):
            raise SamplingError(f"sampling.dataset_index={index} is out of range: the {config.data.dataset} test "
                                f"split has {len(test)} images (0..{len(test) - 1})")
        x = test.x[index]
        image = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        label, source = int(test.y[index]), f"{config.data.dataset} test image {index}"
    if tuple(image.shape[1:]) != (H, W):
        raise SamplingError(f"the image is {image.shape[1]}x{image.shape[2]} but the model generates {H}x{W} images")
    allowed = (1, 3) if task == "colorize" else (C,)
    if image.shape[0] not in allowed:
        raise SamplingError(f"the image has {image.shape[0]} channel(s) but the model generates {C}-channel images")
    return {"image": image.float(), "label": label, "source": source}


def make_mask(spec: str, shape) -> Tensor:
    """Mask (1 or C, H, W) float32: 1 = pixel to fill in, 0 = known.  ``spec`` is a name of ``MASKS`` or a file."""
    C, H, W = shape
    spec = str(spec)
    if spec in MASKS:
        m = torch.zeros(1, H, W)
        if spec == "right_half":
            m[..., W // 2:] = 1
        elif spec == "left_half":
            m[..., :W // 2] = 1
        elif spec == "top_half":
            m[:, :H // 2] = 1
        elif spec == "bottom_half":
            m[:, H // 2:] = 1
        else:
            m[:, H // 4:H - H // 4, W // 4:W - W // 4] = 1
        return m
    if not os.path.splitext(spec)[1]:
        raise SamplingError(f"unknown sampling.mask {spec!r}: one of {', '.join(MASKS)} or a .npy / image file")
    arr = _read_array(spec, "mask", mode="L")
    given = arr.shape
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, C) or tuple(arr.shape[1:]) != (H, W):
        allowed = f"({H}, {W}) or (1, {H}, {W})" + (f" or ({C}, {H}, {W})" if C > 1 else "")
        raise SamplingError(f"mask shape mismatch: {spec!r} has shape {given}, the model generates ({C}, {H}, {W}) "
                            f"images: expected {allowed}")
    if spec.lower().endswith(".npy"):
        if not np.isin(arr, (0.0, 1.0)).all():
            raise SamplingError(f"mask {spec!r} must hold only 0 (known) and 1 (fill in)")
        return torch.from_numpy(arr.astype(np.float32))
    return torch.from_numpy((arr >= 0.5).astype(np.float32))


def _build_constraint(config, sde, condition: dict, mask: Optional[Tensor]):
    """(constraint in model space, masked display image in data space)."""
    scaler = get_data_scaler(config)
    image = condition["image"]
    if _task(config) == "inpaint":
        known = 1.0 - mask
        constraint = Inpaint(sde, scaler(image)[None], known[None])
        shown = image * known + 0.5 * mask
        return constraint, shown
    grey = image.mean(0, keepdim=True)       # a colour image's grey version, or the one-channel image itself
    constraint = Colorize(sde, scaler(grey)[None])
    return constraint, grey.expand(3, -1, -1).clone()


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate(config, sde, model, num_samples: Optional[int] = None, batch_size: Optional[int] = None,
             seed: Optional[int] = None, device="cpu", labels: Optional[Tensor] = None, progress: bool = False,
             classifier=None, condition: Optional[dict] = None):
    """Draw samples with ``config.sampling`` (method, num_steps, eps, schedule, denoise, options, guidance, task).

    Args:
        labels: (N,) labels overriding ``sampling.class_label``.
        classifier: ``(sde, model)`` of the guidance classifier (default: loaded from ``sampling.classifier_workdir``
            when ``guidance=classifier``).
        condition: ``load_condition(config)``'s dict for inpainting / colourisation (default: loaded).
    Returns ``dict(samples=(N, *shape) float32 in data space on the CPU, labels=(N,) or None, nfe=int)``, plus
    ``original``, ``masked``, ``mask`` (each (1, *shape)) for inpainting / colourisation.
    """
    s = config.sampling
    g, task = _guidance(config), _task(config)
    n = int(num_samples if num_samples is not None else s.num_samples)
    bs = int(batch_size if batch_size is not None else s.batch_size)
    seed = int(s.seed if seed is None else seed)
    device = torch.device(device)
    check_guidance(config)
    if g == "classifier" and classifier is None:
        classifier = load_guidance_classifier(config, sde, device=device)
    if g == "classifier":
        check_guidance(config, classifier_classes=int(classifier[1].num_classes))
    if labels is None:
        labels = sampling_labels(config, n, _num_label_classes(config, classifier))
    inverse = get_data_inverse_scaler(config)
    shape = data_shape(config)
    options = sampler_options(config)
    codec = None
    if is_latent(config):           # latent diffusion: sample latents, decode them (sde_diffusion.autoencoder)
        if task != "generate" or g == "classifier":
            raise SamplingError(f"a latent model (model.autoencoder_workdir) draws plain or class-conditional samples "
                                f"in latent space: sampling.task={task} and classifier guidance act on pixels and are "
                                f"not supported")
        from .autoencoder_train import load_codec
        codec = load_codec(config, device, expected=getattr(model, "autoencoder_identity", None))
        shape = codec.shape

    constraint, extra = None, {}
    if task != "generate":
        if not solvers.get_sampler(s.method).supports_constraint:
            raise SamplingError(f"sampling.task={task} re-imposes the known pixels after every step: use a "
                                f"fixed-step sampler that supports it (not {s.method})")
        condition = condition if condition is not None else load_condition(config)
        mask = make_mask(s.mask, shape) if task == "inpaint" else None
        if mask is not None and (mask.sum() == 0 or mask.min() == 1):
            raise SamplingError(f"mask {s.mask!r} marks {'no' if mask.sum() == 0 else 'every'} pixel to fill in: "
                                f"{'nothing to inpaint' if mask.sum() == 0 else 'nothing is known (plain generation)'}")
        constraint, shown = _build_constraint(config, sde, condition, mask)
        extra = {"original": condition["image"][None], "masked": shown[None]}
        if mask is not None:
            extra["mask"] = mask.expand(shape)[None].clone()

    dtype = _autocast_dtype(config, model, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out, nfe = [], 0
    with autocast_network(model, device.type, dtype):
        for start in range(0, n, bs):
            x, res = _generate_batch(config, sde, model, labels, start, min(bs, n - start), shape, classifier,
                                     constraint, codec, gen, progress, device, options)
            out.append(x)
            nfe += res.nfe
    x = inverse(torch.cat(out))
    if config.data.dataset.lower() != "toy":
        x = x.clamp(0.0, 1.0)
    if task == "inpaint":       # the known pixels exactly as given (no round trip through the scaler)
        x = extra["mask"] * x + (1 - extra["mask"]) * extra["original"]
    return dict({"samples": x, "labels": labels, "nfe": nfe}, **extra)


#: salt of the per-batch seeds of ``--mode sample`` (batch i draws from ``mix_seed(sampling.seed, salt, i)``)
SAMPLE_BATCH_SALT = 0x53414D50


def generate_sharded(ctx, config, sde, model, device="cpu", classifier=None, condition: Optional[dict] = None):
    """``generate`` for ``--mode sample``, in batches of ``sampling.batch_size`` with one seed per batch (batch i:
    ``mix_seed(sampling.seed, SAMPLE_BATCH_SALT, i)``), shared out across the ranks of ``ctx`` (``distributed``:
    rank k draws batches k, k + K, ...; rank 0 gathers them in order).  The samples therefore depend on the seed and
    the batch size only, not on the number of processes.  Returns ``generate``'s dict on rank 0 (progress bar over
    the batches on a terminal), None on the other ranks."""
    s = config.sampling
    n, bs = int(s.num_samples), int(s.batch_size)
    if n < 1 or bs < 1:
        raise SamplingError(f"sampling.num_samples and sampling.batch_size must be >= 1, got {n} and {bs}")
    check_guidance(config)
    labels = sampling_labels(config, n, _num_label_classes(config, classifier))
    if _task(config) != "generate" and condition is None:
        condition = load_condition(config)
    nb = math.ceil(n / bs)
    parts = {}

    def work(i):
        b = min(bs, n - i * bs)
        res = generate(config, sde, model, num_samples=b, batch_size=b, device=device, classifier=classifier,
                       seed=mix_seed(int(s.seed), SAMPLE_BATCH_SALT, i), condition=condition, progress=step_bar,
                       labels=labels[i * bs:i * bs + b] if labels is not None else None)
        res.pop("labels")
        return res

    step_bar = nb == 1 and ctx.is_main and sys.stderr.isatty()       # one batch: the solver's bar over its steps
    from tqdm.auto import tqdm
    bar = tqdm(total=nb, desc="sampling", unit="batch", dynamic_ncols=True,
               disable=None if ctx.is_main and nb > 1 else True)

    def record(i, res):
        parts[i] = res
        bar.update(1)

    try:
        distributed.run_sharded(ctx, range(nb), work, record, where="sampling")
    finally:
        bar.close()
    if not ctx.is_main:
        return None
    out = {k: v for k, v in parts[0].items() if k not in ("samples", "nfe")}
    out.update(samples=torch.cat([parts[i]["samples"] for i in range(nb)]), labels=labels,
               nfe=sum(int(parts[i]["nfe"]) for i in range(nb)))
    return out


def _autocast_dtype(config, model, device) -> Optional[torch.dtype]:
    """``sampling.autocast``'s dtype for the network calls (None: float32)."""
    name = str(config.sampling.get("autocast", "none")).lower()
    dtypes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise SamplingError(f"unknown sampling.autocast {name!r}; available: {', '.join(dtypes)}")
    if name == "fp16" and device.type != "cuda":
        raise SamplingError("sampling.autocast=fp16 needs a CUDA device; use bf16 on a CPU")
    if dtypes[name] is not None and isinstance(model, Model):
        raise SamplingError(f"sampling.autocast={name} casts our networks' calls; a model loaded with "
                            f"model.source={config.model.get('source', 'diffusers')} runs in float32")
    return dtypes[name]


def _generate_batch(config, sde, model, labels, start, b, shape, classifier, constraint, codec, gen, progress,
                    device, options):
    """One batch of ``generate``: (samples (b, ...) float32 on the CPU before the inverse scaler, the sampler's
    result)."""
    s = config.sampling
    y = labels[start:start + b].to(device) if labels is not None else None
    score_fn = guided_score_fn(config, sde, model, y, classifier)
    if constraint is not None:
        score_fn = constraint.conditional_score(as_model(score_fn).score_fn(sde), covariance="isotropic",
                                                data_var=float(s.get("inpaint_data_var", DATA_VAR)))
    res = solvers.sample(sde, score_fn, (b, *shape), method=s.method, num_steps=int(s.num_steps),
                         generator=gen, eps=float(s.eps), schedule=s.schedule, denoise=bool(s.denoise),
                         progress=progress, device=device, constraint=constraint, **options)
    x = res.samples
    if constraint is not None:
        x = constraint.finalize(x)
    if codec is not None:
        x = codec.decode(x)
    return x.float().cpu(), res


# ------------------------------------------------------------------------------------------------ output
def class_rows(x: Tensor, labels: Tensor, per_class: int = 16):
    """Images (N, C, H, W) arranged one class per row (classes in increasing order, at most ``per_class`` each,
    blank where a class has fewer): returns (images (R * m, C, H, W), m) for ``image_grid(..., nrow=m)``."""
    classes = torch.unique(labels).tolist()
    m = min(per_class, max(int((labels == c).sum()) for c in classes))
    rows = []
    for c in classes:
        xc = x[labels == c][:m]
        pad = torch.ones((m - xc.shape[0], *x.shape[1:]), dtype=x.dtype)
        rows.append(torch.cat([xc, pad]))
    return torch.cat(rows), m


def _restoration_rows(result: dict, per_row: int = 8):
    """[original, masked input, up to ``per_row`` completions] per row: (images, row length)."""
    x, orig, shown = result["samples"], result["original"], result["masked"]
    rows = []
    for i in range(0, x.shape[0], per_row):
        chunk = x[i:i + per_row]
        pad = torch.ones((per_row - chunk.shape[0], *x.shape[1:]), dtype=x.dtype)
        rows.append(torch.cat([orig, shown, chunk, pad]))
    return torch.cat(rows), per_row + 2


def save_samples(config, result: dict, out_dir: str, step: int = -1, reference: Optional[Tensor] = None) -> dict:
    """Write ``samples.npz`` and ``samples.png`` into ``out_dir`` (both atomically); returns their paths.

    The grid: inpainting / colourisation rows of [original, masked input, 8 completions]; labelled samples of
    several classes one class per row; otherwise up to 256 samples."""
    os.makedirs(out_dir, exist_ok=True)
    x = result["samples"]
    arrays = {"samples": x.numpy().astype(np.float32), "nfe": np.int64(result["nfe"]), "step": np.int64(step)}
    if result.get("labels") is not None:
        arrays["labels"] = result["labels"].numpy().astype(np.int64)
    for key in ("original", "masked", "mask"):
        if key in result:
            arrays[key] = result[key].numpy().astype(np.float32)
    npz = os.path.join(out_dir, "samples.npz")
    with atomic_path(npz, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    png = os.path.join(out_dir, "samples.png")
    with atomic_path(png, suffix=".png") as tmp_png:
        _save_grid(config, result, x, tmp_png, step, reference)
    return {"npz": npz, "png": png}


def _save_grid(config, result: dict, x: Tensor, path: str, step: int, reference: Optional[Tensor]) -> None:
    if x.dim() == 4:
        nrow = None
        if "original" in result:
            grid, nrow = _restoration_rows(result)
        elif result.get("labels") is not None and len(torch.unique(result["labels"])) > 1:
            grid, nrow = class_rows(x, result["labels"])
        else:
            grid = x[:256]
        save_image_grid(grid, path, nrow=nrow, scale=max(1, 128 // x.shape[-1]) if x.shape[-1] < 32 else 2)
    else:
        plot_points(x, path, reference=reference, title=f"{config.name} samples (step {step})")


def output_tag(config) -> str:
    """Folder suffix naming the task, guidance and label ('' for plain sampling)."""
    s = config.sampling
    parts = []
    task = _task(config)
    if task != "generate":
        src = f"idx{int(s.dataset_index)}" if int(s.dataset_index) >= 0 else \
            os.path.splitext(os.path.basename(str(s.image)))[0]
        parts.append(f"{task}_{src}")
        if task == "inpaint":
            parts.append(str(s.mask) if str(s.mask) in MASKS else
                         "mask_" + os.path.splitext(os.path.basename(str(s.mask)))[0])
    g = _guidance(config)
    if g != "none":
        parts.append(f"{g}_w{float(s.guidance_scale):g}")
    if int(s.class_label) >= 0:
        parts.append(f"y{int(s.class_label)}")
    return "_".join(parts)


def digits_class_accuracy(x: Tensor, labels: Tensor, cache_dir: Optional[str] = None) -> dict:
    """Share of samples the digits classifier of ``evaluation.digits`` labels as the requested class, per class."""
    from ..evaluation.digits import DigitsEvaluator
    evaluator = DigitsEvaluator(cache_dir)
    pred = evaluator.classify(x).argmax(1)
    per_class, counts = {}, {}
    for c in sorted(torch.unique(labels).tolist()):
        sel = labels == c
        per_class[int(c)] = float((pred[sel] == c).double().mean())
        counts[int(c)] = int(sel.sum())
    return {"overall": float((pred == labels).double().mean()), "per_class": per_class, "counts": counts,
            "predicted": pred.tolist(), "classifier_test_accuracy": evaluator.test_accuracy}


def _digits_cache_dir(workdir: str) -> str:
    """Where the digits classifier is cached: ``<workdir>/eval`` if ``--mode eval`` already put it there, else
    ``<workdir>/samples`` (sampling writes nothing outside its samples folder)."""
    from ..evaluation.digits import CLASSIFIER_FILENAME
    evaluated = os.path.join(workdir, "eval")
    if os.path.isfile(os.path.join(evaluated, CLASSIFIER_FILENAME)):
        return evaluated
    return os.path.join(workdir, "samples")


MODEL_SOURCES = ("ours", "export", "diffusers")


def load_sampling_model(config, workdir: str, checkpoint=None, device="cpu"):
    """``(config, sde, model, step, name)`` of the model ``config.model.source`` names: ``ours`` — the workdir's
    checkpoint (EMA weights); ``export`` — an export folder ``model.path`` (``run.export``: safetensors EMA weights +
    config, no optimiser state); ``diffusers`` — a diffusers UNet2DModel folder ``model.path`` with its scheduler
    config (``sde_diffusion.external``: the model is a ``prediction.Model`` on the scheduler's own VP path, and
    ``data.image_size`` / ``num_channels`` / ``centered`` become the UNet's, images in [-1, 1]).  ``name`` names the
    samples' folder: ``step_<step>``, ``export_step_<step>`` or ``diffusers``."""
    source = str(config.model.get("source", "ours")).lower()
    if source not in MODEL_SOURCES:
        raise SamplingError(f"unknown model.source {source!r}; available: {', '.join(MODEL_SOURCES)}")
    if source == "ours":
        config, sde, model = load_model(workdir, config=config, checkpoint=checkpoint, device=device)
        return config, sde, model, model.checkpoint_step, f"step_{model.checkpoint_step:08d}"
    path = str(config.model.get("path", ""))
    if source == "export":
        from .export import load_export
        config, sde, model = load_export(path, config=config, device=device)
        return config, sde, model, model.checkpoint_step, f"export_step_{model.checkpoint_step:08d}"
    from ..external import ExternalModelError, load_diffusers
    if config.data.dataset.lower() == "toy":
        raise SamplingError("model.source=diffusers samples images: the config's data.dataset must not be toy")
    try:
        ext = load_diffusers(path, device=device)
    except ExternalModelError as e:
        raise SamplingError(str(e)) from None
    C, H, W = ext.shape
    if H != W:
        raise SamplingError(f"the diffusers UNet makes {H}x{W} images; sampling to disk handles square images only")
    config = copy.deepcopy(config)
    config.data.num_channels, config.data.image_size, config.data.centered = C, H, True
    logging.info("diffusers model from %s: %s, prediction_type %s, samples of shape %s", path, ext.sde,
                 ext.prediction_type, ext.shape)
    return config, ext.sde, ext.model, 0, "diffusers"


def sample(config, workdir: str, checkpoint=None, device=None, out_dir: Optional[str] = None) -> dict:
    """Sample from the EMA weights of the latest (or named) checkpoint; returns paths and the number of samples.

    Guided digits samples are also labelled by the digits classifier: ``class_accuracy.json`` holds the share
    labelled as the requested class, per class (the classifier is cached in ``<workdir>/eval`` or
    ``<workdir>/samples``)."""
    ctx = distributed.current()
    error = None
    try:
        device = distributed.rank_device(ctx, get_device(device or config.device))
        check_guidance(config, warn=False)
        task = _task(config)
        condition = load_condition(config) if task != "generate" else None
        if task == "inpaint":
            make_mask(config.sampling.mask, data_shape(config))          # a bad mask fails before the model loads
        config, sde, model, step, name = load_sampling_model(config, workdir, checkpoint=checkpoint, device=device)
        classifier = None
        if _guidance(config) == "classifier":
            classifier = load_guidance_classifier(config, sde, device=device)
    except Exception as e:
        error = e
    ctx.check(error, "the sampling's set-up")        # in a process group: every rank stops, rank 0 says why
    logging.info("sampling %d examples from %s (step %d) with %s, %d steps, options %s, guidance %s (%g), task %s%s",
                 config.sampling.num_samples, workdir, step, config.sampling.method, config.sampling.num_steps,
                 sampler_options(config), config.sampling.guidance, config.sampling.guidance_scale, task,
                 f", {ctx.world_size} processes" if ctx.enabled else "")
    result = generate_sharded(ctx, config, sde, model, device=device, classifier=classifier, condition=condition)
    if not ctx.is_main:             # rank 0 writes the samples
        return {"rank": ctx.rank}
    tag = output_tag(config)
    out_dir = out_dir or os.path.join(workdir, "samples", name + (f"_{tag}" if tag else ""))
    reference = None
    if config.data.dataset.lower() == "toy":
        reference = get_dataset(config, "test").batch(0, min(5000, config.sampling.num_samples), 12345)[0]
    paths = save_samples(config, result, out_dir, step=step, reference=reference)
    info = {"step": step, "nfe": result["nfe"], "sampling": config.sampling.to_dict()}
    if str(config.model.get("source", "ours")).lower() != "ours":
        info["model"] = {"source": str(config.model.source), "path": str(config.model.path)}
    if condition is not None:
        info["source"] = condition["source"]
        info["source_label"] = condition["label"]
    accuracy = None
    if config.data.dataset.lower() == "digits" and task == "generate" and result["labels"] is not None \
            and bool((result["labels"] < 10).all()):
        accuracy = digits_class_accuracy(result["samples"], result["labels"], cache_dir=_digits_cache_dir(workdir))
        atomic_write_text(json.dumps(accuracy, indent=2), os.path.join(out_dir, "class_accuracy.json"))
        info["class_accuracy"] = {k: accuracy[k] for k in ("overall", "per_class")}
    atomic_write_text(json.dumps(info, indent=2), os.path.join(out_dir, "sampling_config.json"))
    logging.info("wrote %s and %s (%d score evaluations)", paths["npz"], paths["png"], result["nfe"])
    return dict(paths, step=step, num_samples=int(result["samples"].shape[0]), nfe=result["nfe"],
                class_accuracy=accuracy)
