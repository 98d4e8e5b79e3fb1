"""VP SDE on a 1-D Gaussian mixture (default: ``bimodal``) with a residual MLP; the exact score is known."""
from .toy_2d import get_config as _toy2d


def get_config():
    config = _toy2d()
    config.name = "toy_1d"
    config.data.name = "bimodal"
    config.data.dim = 1
    return config
