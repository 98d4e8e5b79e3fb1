"""VP SDE on a 2-D toy mixture (default: ``ring``, eight Gaussians on the unit circle, whose diffused score is exact)
with a residual MLP; trains in seconds on a CPU."""
from .default import get_default_config


def get_config():
    config = get_default_config()
    config.name = "toy_2d"
    config.training.sde = "vp"
    config.training.batch_size = 256
    config.training.n_iters = 2000
    config.training.log_freq = 100
    config.training.checkpoint_freq = 500
    config.training.snapshot_freq = 1000
    config.training.snapshot_num_samples = 1000
    config.sampling.method = "ode"
    config.sampling.solver = "heun"
    config.sampling.num_steps = 100
    config.sampling.num_samples = 2000
    config.sampling.batch_size = 2000
    config.eval.num_samples = 10_000
    config.eval.batch_size = 2000
    config.data.dataset = "toy"
    config.data.name = "ring"
    config.data.dim = 2
    config.data.image_size = 0
    config.data.num_channels = 0
    config.data.centered = False      # toy data are used as they are
    config.data.random_flip = False
    config.model.name = "mlp"
    config.model.nf = 128
    config.model.num_layers = 3
    config.model.dropout = 0.0
    config.model.ema_rate = 0.99
    config.optim.lr = 2e-3
    config.optim.warmup = 100
    return config
