"""vp_digits with Improved DDPM's learned reverse variances (Nichol & Dhariwal 2021, sec. 3.1).

The U-Net outputs 2 channels (eps and the variance interpolation v, Sigma = exp(v log beta + (1 - v) log beta-tilde),
their eq. 15), trained on the discrete DDPM chain with the hybrid loss L_simple + 0.001 L_vlb (eq. 16, stop-gradient
on the mean in L_vlb); the ancestral sampler uses the learned variance.  Evaluate its bounds with
``--mode eval --config.eval.enable_elbo=true``: the discrete bound then comes for beta, beta-tilde and the learned
variance from the same network calls.
"""
from .vp_digits import get_config as _vp_digits


def get_config():
    config = _vp_digits()
    config.name = "vp_digits_learned_var"
    config.training.loss = "ddpm"
    config.training.vlb_weight = 0.001
    config.model.learned_variance = True
    config.sampling.variance = "learned"
    return config
