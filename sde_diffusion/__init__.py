"""sde_diffusion: score-based generative modelling through stochastic differential equations."""
from . import sdes, targets  # noqa: F401

__version__ = "0.1.0"
