"""Conditional flow matching on scikit-learn's 8x8 digits: the linear interpolant x_t = (1 - t) x0 + t eps (rectified
flow), a velocity-output U-Net trained on ||v - (eps - x0)||^2, sampled by Heun on the probability flow.

The network, data, optimiser and length are vp_digits' (a fair comparison at the same budget); only the process, the
loss and the output differ.  ``--config.training.fm_ot=true`` pairs each batch's noise with its data by exact
minibatch optimal transport.
"""
from .vp_digits import get_config as _vp_digits


def get_config():
    config = _vp_digits()
    config.name = "fm_digits"
    config.training.sde = "linear"          # sde_diffusion.interpolants.LinearInterpolant (T = 1 - 1e-3)
    config.training.loss = "fm"
    config.training.eps = 1e-5
    config.training.fm_ot = False
    config.model.parameterization = "velocity"
    config.model.time_scale = 999.0         # positional embedding of 999 t, t in [0, 1)
    config.sampling.method = "ode"
    config.sampling.solver = "heun"
    config.sampling.num_steps = 50
    config.sampling.schedule = "uniform"
    config.sampling.eps = 1e-3              # the path's sampling_eps: sigma(eps) = 1e-3, then the jump to x0_hat
    return config
