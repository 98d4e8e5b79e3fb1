"""VE SDE on CIFAR-10 (NCSN++-style): sigma in [0.01, 50], data in [0, 1], BigGAN residual blocks, Gaussian Fourier
time features, score parameterisation (output scaled by 1/sigma_t), PC sampling with the reverse-diffusion predictor
and a Langevin corrector (snr 0.16).  Same optimiser recipe as vp_cifar."""
from .vp_cifar import get_config as _vp


def get_config():
    config = _vp()
    config.name = "ve_cifar"
    config.training.sde = "ve"
    config.sampling.method = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.sampling.snr = 0.16
    config.sampling.eps = 1e-5
    config.data.centered = False
    config.model.parameterization = "score"
    config.model.resblock_type = "biggan"
    config.model.embedding_type = "fourier"
    config.model.fourier_scale = 16.0
    return config
