"""VP SDE on CIFAR-10 with a DDPM-size U-Net (35.7 M parameters): DDPM++'s recipe at DDPM's size.

Published hyper-parameters (Song et al. 2021 / Ho et al. 2020): Adam 2e-4, warm-up 5000, grad clip 1, batch 128,
EMA 0.9999, 1.3 M iterations, beta in [0.1, 20], continuous-time DSM with uniform weighting.
"""
from .default import get_default_config


def get_config():
    config = get_default_config()
    config.name = "vp_cifar"
    config.training.sde = "vp"
    config.training.checkpoint_freq = 10_000
    config.training.snapshot_freq = 50_000
    config.sampling.method = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.sampling.num_steps = 1000
    config.sampling.eps = 1e-3
    config.data.dataset = "cifar10"
    config.data.root = "data/cifar10"
    config.data.centered = True
    config.model.name = "unet"
    config.model.parameterization = "noise"
    config.model.resblock_type = "ddpm"
    config.model.nf = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.skip_rescale = True
    config.model.embedding_type = "positional"
    config.eval.num_generated = 50_000     # FID over 50k samples, as published
    config.eval.generate_batch_size = 500
    return config
