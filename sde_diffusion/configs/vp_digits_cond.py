"""Class-conditional VP SDE on scikit-learn's 8x8 digits, for classifier-free guidance.

``vp_digits`` with a label embedding (10 classes + the null label) joined to the time embedding, and labels dropped to
the null label with probability ``training.p_uncond = 0.1``, so one network learns p(x | y) and p(x).  Sampling with
``--config.sampling.guidance=cfg --config.sampling.guidance_scale=w`` uses s_u + w (s_c - s_u).
"""
from .vp_digits import get_config as get_digits_config


def get_config():
    config = get_digits_config()
    config.name = "vp_digits_cond"
    config.model.num_classes = 10
    config.training.p_uncond = 0.1
    config.sampling.guidance = "cfg"
    config.sampling.guidance_scale = 2.0
    config.sampling.class_label = -1   # cycle through the ten classes
    config.sampling.num_samples = 80
    config.sampling.batch_size = 80
    return config
