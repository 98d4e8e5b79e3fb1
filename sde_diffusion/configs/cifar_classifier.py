"""Time-dependent classifier p(y | x_t, t) on CIFAR-10, for classifier guidance of ``vp_cifar`` models.

The same recipe as ``digits_classifier`` (see there for the ``classifier`` section) at CIFAR-10's size: four
conv blocks (32 -> 16 -> 8 -> 4), random flips, the VP SDE of ``vp_cifar``.  Song et al. (2021, App. I) train their
noise-conditional CIFAR-10 classifier (a Wide ResNet) for guidance the same way; this one is much smaller and meant
for a GPU: ``python main.py --mode train_classifier --config cifar_classifier --workdir runs/cifar_cls``.
"""
from .digits_classifier import classifier_section
from .vp_cifar import get_config as get_cifar_config


def get_config():
    config = get_cifar_config()
    config.name = "cifar_classifier"
    config.classifier = classifier_section(
        channels=(64, 128, 256, 256), emb_dim=128, data_std=0.5, n_iters=100_000, batch_size=128, lr=3e-4,
        weight_decay=0.0, checkpoint_freq=5000, log_freq=100)
    return config
