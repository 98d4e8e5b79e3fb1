"""EDM (Karras et al. 2022) on CIFAR-10: the path x = x0 + sigma eps, the preconditioning of Table 1, the EDM loss and
the deterministic Heun sampler (18 steps, 35 network calls, rho = 7, sigma in [0.002, 80]).

Published hyper-parameters (Karras et al. 2022, Table 7 / App. F.1, unconditional CIFAR-10, "DDPM++ / VP" column):
batch 512, Adam lr 1e-3 with a 10 Mimg linear ramp-up (= 19,531 updates of 512), EMA half-life 0.5 Mimg (= per-update
decay 0.5^(512 / 500000) = 0.99929), dropout 0.13, 200 Mimg (= 390,625 updates), sigma_data 0.5, ln sigma ~
N(-1.2, 1.2^2); DDPM++ network with 128 base channels, multipliers (2, 2, 2), 4 residual blocks per resolution,
attention at 16x16 (56 M parameters).
Differences from the paper: no augmentation pipeline (EDM's non-leaking augmentations at p = 0.12 and their
conditioning input); our EMA is a fixed decay (with score_sde's warm-up) rather than a half-life in images; our
U-Net is score_sde's DDPM++ with BigGAN resampling blocks and positional time embedding of c_noise (EDM's uses
Fourier features of c_noise for the VE variant, positional for DDPM++: the same here); mixed precision is off.
"""
from .vp_cifar import get_config as _vp_cifar


def get_config():
    config = _vp_cifar()
    config.name = "edm_cifar"
    config.training.sde = "edm"
    config.training.loss = "edm"
    config.training.P_mean = -1.2
    config.training.P_std = 1.2
    config.training.batch_size = 512
    config.training.n_iters = 390_625
    config.model.sigma_max = 80.0
    config.model.precond = "edm"
    config.model.sigma_data = 0.5
    config.model.parameterization = "x0"
    config.model.time_scale = 250.0          # the network's time input is c_noise = ln(sigma) / 4
    config.model.nf = 128
    config.model.ch_mult = (2, 2, 2)
    config.model.num_res_blocks = 4
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.13
    config.model.resblock_type = "biggan"
    config.model.ema_rate = 0.99929
    config.optim.lr = 1e-3
    config.optim.warmup = 19_531
    config.optim.grad_clip = 0.0             # EDM does not clip gradients
    config.sampling.method = "edm"
    config.sampling.num_steps = 18
    config.sampling.schedule = "edm"
    config.sampling.eps = 0.002
    return config
