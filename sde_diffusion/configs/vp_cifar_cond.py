"""Class-conditional VP SDE on CIFAR-10 for classifier-free guidance (Ho & Salimans 2021).

``vp_cifar`` with a label embedding (10 classes + the null label) added to the time embedding and labels dropped to
the null label with probability ``training.p_uncond = 0.1``, so one network learns p(x | y) and p(x).  Sampling with
``--config.sampling.guidance=cfg --config.sampling.guidance_scale=w`` uses s_u + w (s_c - s_u): w = 1 is the plain
conditional model, Ho & Salimans' rho is w - 1; the default w = 1.3 is a mild guidance (rho = 0.3) - raise it for
sharper, less diverse samples.
"""
from .vp_cifar import get_config as get_cifar_config


def get_config():
    config = get_cifar_config()
    config.name = "vp_cifar_cond"
    config.model.num_classes = 10
    config.training.p_uncond = 0.1
    config.sampling.guidance = "cfg"
    config.sampling.guidance_scale = 1.3
    config.sampling.class_label = -1   # cycle through the ten classes
    config.sampling.num_samples = 100
    config.sampling.batch_size = 100
    return config
