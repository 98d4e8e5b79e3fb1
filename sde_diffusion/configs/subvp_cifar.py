"""sub-VP SDE on CIFAR-10: the vp_cifar network and recipe with the sub-VP SDE (Song et al. 2021, eq. 11)."""
from .vp_cifar import get_config as _vp


def get_config():
    config = _vp()
    config.name = "subvp_cifar"
    config.training.sde = "subvp"
    return config
