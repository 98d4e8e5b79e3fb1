"""EDM (Karras et al. 2022) on scikit-learn's 8x8 digits: the path x = x0 + sigma eps on [0, 80], EDM's
preconditioning around vp_digits' U-Net (c_skip, c_out, c_in, c_noise; sigma_data = 0.5), the EDM loss (ln sigma ~
N(-1.2, 1.2^2), lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2) and EDM's deterministic Heun sampler on
its rho = 7 grid from sigma = 80 to 0.002 (Table 1: 18 steps, 35 network calls).
"""
from .vp_digits import get_config as _vp_digits


def get_config():
    config = _vp_digits()
    config.name = "edm_digits"
    config.training.sde = "edm"             # sde_diffusion.interpolants.EDMPath (T = sigma_max = 80)
    config.training.loss = "edm"
    config.training.P_mean = -1.2
    config.training.P_std = 1.2
    config.model.sigma_max = 80.0           # T and the prior N(0, 80^2 I) (Table 1)
    config.model.precond = "edm"
    config.model.sigma_data = 0.5
    config.model.parameterization = "x0"
    config.model.time_scale = 250.0         # the network's time input is c_noise = ln(sigma) / 4, in about [-1.6, 1.1]
    config.sampling.method = "edm"
    config.sampling.num_steps = 18
    config.sampling.schedule = "edm"
    config.sampling.eps = 0.002             # sigma_min (Table 1)
    return config
