"""VP SDE on scikit-learn's 8x8 digits, sized for a 2-core CPU: recognisable samples after about 10 minutes.

A small DDPM++-style U-Net (8x8 -> 4x4, attention at 4x4), batch 128, Adam 2e-3 with a short warm-up, EMA 0.999.
"""
from .default import get_default_config


def get_config():
    config = get_default_config()
    config.name = "vp_digits"
    config.training.sde = "vp"
    config.training.batch_size = 128
    config.training.n_iters = 4000
    config.training.log_freq = 50
    config.training.checkpoint_freq = 500
    config.training.snapshot_freq = 1000
    config.training.snapshot_num_samples = 64
    config.sampling.method = "ancestral"
    config.sampling.num_steps = 500
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64
    config.eval.batch_size = 180
    config.data.dataset = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.dim = 64
    config.data.centered = True
    config.data.random_flip = False   # digits are not mirror-symmetric
    config.model.name = "unet"
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.model.resblock_type = "biggan"
    config.model.ema_rate = 0.999
    config.optim.lr = 2e-3
    config.optim.warmup = 200
    # bf16 where the CPU computes it natively: 1.5x faster here, the loss curve within 0.2 % of float32's (README)
    config.compute.autocast = "auto"
    return config
