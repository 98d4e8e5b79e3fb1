"""Latent diffusion (Rombach et al. 2022) on scikit-learn's 8x8 digits: a KL-regularised autoencoder maps 1x8x8 images
to 2x4x4 latents (posterior means scaled to unit variance), and flow matching (fm_digits' process, loss and Heun
sampler) runs on the latents with a small U-Net; sampling decodes, ``--mode eval`` measures in data space.

Two runs, the second depending on the first's checkpoint::

    python main.py --mode train_autoencoder --config ldm_digits --workdir runs/digits_ae
    python main.py --mode train --config ldm_digits --workdir runs/ldm_digits \
        [--config.model.autoencoder_workdir=runs/digits_ae]
    python main.py --mode sample --workdir runs/ldm_digits

Any family diffuses in the latent space by overriding the process keys (e.g. ``--config.training.sde=vp
--config.training.loss=dsm --config.model.parameterization=noise --config.sampling.method=dpm_solver``).

The ``autoencoder`` section (``autoencoder_section``; absent from data-space configs):
  ch, ch_mult, num_res_blocks   widths: ch * ch_mult[i] per level, a stride-2 conv between levels (downsampling
                                f = 2^(len(ch_mult) - 1)); num_res_blocks ResNet blocks per level
  latent_channels               c of the (c, H / f, W / f) latents
  beta                          weight of KL(q(z | x) || N(0, I)) next to the per-example summed reconstruction error
  recon                         l2 | l1 (perceptual-free: no LPIPS, no discriminator)
  n_iters, batch_size, lr, ema_rate, grad_clip, log_freq, checkpoint_freq, keep_checkpoints, progress
"""
import ml_collections

from .fm_digits import get_config as _fm_digits


def autoencoder_section(**overrides) -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    a.ch = 32
    a.ch_mult = (1, 2)            # 8x8 -> 4x4 (f = 2)
    a.num_res_blocks = 1
    a.latent_channels = 2         # 2x4x4 = 32 numbers per 64-pixel digit
    a.beta = 1e-3
    a.recon = "l2"
    a.n_iters = 1500
    a.batch_size = 64
    a.lr = 1e-3
    a.ema_rate = 0.999
    a.grad_clip = 1.0
    a.log_freq = 100
    a.checkpoint_freq = 500
    a.keep_checkpoints = 2
    a.progress = True
    for k, v in overrides.items():
        setattr(a, k, v)
    return a


def get_config():
    config = _fm_digits()
    config.name = "ldm_digits"
    config.autoencoder = autoencoder_section()
    config.model.autoencoder_workdir = "runs/digits_ae"
    config.model.latent_sample = False
    # the score network on 2x4x4 latents: 4x4 -> 2x2, attention at 2x2
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (2,)
    config.model.sigma_data = 1.0      # unit-variance latents (EDM's preconditioning, if a run switches to it)
    config.eval.enable_bpd = False     # bits/dim of latents are not bits/dim of digits (eval skips it anyway)
    return config
