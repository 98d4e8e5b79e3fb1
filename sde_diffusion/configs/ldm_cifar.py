"""Latent diffusion (Rombach et al. 2022) on CIFAR-10: a KL-regularised autoencoder with downsampling f = 2 maps
3x32x32 images to 4x16x16 latents (LDM's "KL-f2"-type first stage at CIFAR's size; the paper trains no CIFAR model),
and a VP / DDPM eps-prediction U-Net diffuses the unit-variance latents (LDM's linear beta schedule as our VP SDE with
beta in [0.1, 20]; sampled by DPM-Solver).

First stage as LDM's ``AutoencoderKL`` where it applies: base channels 128, multipliers (1, 2), KL weight 1e-6 next
to an L1 reconstruction summed over pixels, Adam 4.5e-6 x batch (here 1e-4 at batch 64).  Perceptual-free: no LPIPS
and no patch discriminator (LDM's first stages use both), which blurs reconstructions at 32x32 — the latent model's
FID is bounded by the autoencoder's reconstruction FID.

    python main.py --mode train_autoencoder --config ldm_cifar --workdir runs/cifar_ae
    python main.py --mode train --config ldm_cifar --workdir runs/ldm_cifar
"""
from .ldm_digits import autoencoder_section
from .vp_cifar import get_config as _vp_cifar


def get_config():
    config = _vp_cifar()
    config.name = "ldm_cifar"
    config.autoencoder = autoencoder_section(ch=128, ch_mult=(1, 2), num_res_blocks=2, latent_channels=4, beta=1e-6,
                                             recon="l1", n_iters=200_000, batch_size=64, lr=1e-4, ema_rate=0.9999,
                                             log_freq=100, checkpoint_freq=10_000, keep_checkpoints=3)
    config.model.autoencoder_workdir = "runs/cifar_ae"
    config.model.latent_sample = False
    config.model.nf = 128
    config.model.ch_mult = (1, 2, 2)         # 16x16 -> 4x4
    config.model.attn_resolutions = (8,)
    config.sampling.method = "dpm_solver"
    config.sampling.num_steps = 20
    config.eval.enable_bpd = False
    return config
