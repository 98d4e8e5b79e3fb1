"""Time-dependent classifier p(y | x_t, t) on the 8x8 digits, for classifier guidance of ``vp_digits`` models.

Trained with ``python main.py --mode train_classifier --config digits_classifier --workdir runs/digits_cls`` on the
digits perturbed by the same VP SDE as ``vp_digits`` (beta in [0.1, 20]): x_t = a(t) x0 + sigma(t) z, t ~ U(eps, 1),
cross-entropy on the clean label.  ``sampling.guidance=classifier`` checks that the classifier's SDE is the score
model's.

The ``classifier`` section (absent from the score-model configs):
  name            ``conv`` (``sde_diffusion.classifier.ConvClassifier``) or ``toy_mlp``
  num_classes     number of classes
  channels        conv widths, one block each, 2x average pooling between blocks (conv) / ``hidden``, ``depth`` (MLP)
  emb_dim         width of the time embedding
  data_std        std of the data in model space (inputs are scaled by 1 / sqrt(a^2 data_std^2 + sigma^2));
                  0.75 for digits in [-1, 1]
  n_iters, batch_size, lr, weight_decay, grad_clip, eps (smallest training time), log_freq, checkpoint_freq,
  keep_checkpoints, progress
  eval_times      times t at which the test-set accuracy is measured after training (written to eval.json)
"""
import ml_collections

from .vp_digits import get_config as get_digits_config


def classifier_section(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "conv"
    c.num_classes = 10
    c.channels = (32, 64, 64)
    c.emb_dim = 64
    c.hidden = 128          # toy_mlp only
    c.depth = 3             # toy_mlp only
    c.data_std = 0.75
    c.n_iters = 3000
    c.batch_size = 128
    c.lr = 2e-3
    c.weight_decay = 1e-4
    c.grad_clip = 1.0
    c.eps = 1e-3
    c.log_freq = 50
    c.checkpoint_freq = 500
    c.keep_checkpoints = 2
    c.progress = True
    c.eval_times = (0.01, 0.25, 0.5, 0.75, 1.0)
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def get_config():
    config = get_digits_config()
    config.name = "digits_classifier"
    config.classifier = classifier_section()
    return config
