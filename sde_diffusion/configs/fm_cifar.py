"""Conditional flow matching on CIFAR-10 (rectified-flow / OT path x_t = (1 - t) x0 + t eps, velocity output, Heun on
the probability flow).

Published hyper-parameters, adapted to our DDPM-size U-Net:
* Tong et al. 2024 (TorchCFM, ``examples/images/cifar10``): U-Net with 128 base channels, ch_mult (1, 2, 2, 2),
  2 residual blocks, attention at 16x16, dropout 0.1; Adam lr 2e-4, batch 128, linear warm-up 5000, grad clip 1,
  EMA 0.9999, 400k updates; sigma_min = 0.  Taken as they are: that network is vp_cifar's.
* Lipman et al. 2023, App. E (Table 3), as we read it: 256 base channels, batch 256, lr 5e-4 with polynomial decay,
  warm-up 45k, ~391k iterations, sigma_min = 1e-4 — a network twice as wide; not used here (raise model.nf=256,
  training.batch_size=256, optim.lr=5e-4, optim.warmup=45000 to follow it; we have no polynomial decay).
Differences: our interpolant stops at T = 1 - 1e-3 rather than 1 (sde_diffusion.interpolants) and the sampler is
Heun with 50 steps (Tong et al. report dopri5 and Euler).
"""
from .vp_cifar import get_config as _vp_cifar


def get_config():
    config = _vp_cifar()
    config.name = "fm_cifar"
    config.training.sde = "linear"
    config.training.loss = "fm"
    config.training.eps = 1e-5
    config.training.fm_ot = False
    config.training.batch_size = 128
    config.training.n_iters = 400_001
    config.model.parameterization = "velocity"
    config.model.time_scale = 999.0
    config.model.dropout = 0.1
    config.model.ema_rate = 0.9999
    config.optim.lr = 2e-4
    config.optim.warmup = 5000
    config.optim.grad_clip = 1.0
    config.sampling.method = "ode"
    config.sampling.solver = "heun"
    config.sampling.num_steps = 50
    config.sampling.schedule = "uniform"
    config.sampling.eps = 1e-3
    return config
