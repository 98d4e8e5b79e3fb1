"""Suite-wide settings.

One intra-op thread: the tests evaluate exact scores and small networks on tiny tensors, where PyTorch's thread pool
costs far more than it gains (a (64, 1) softmax measured 15 ms with the default threads on a busy 2-core machine,
6 us with one), and one thread keeps timings stable whatever else the machine runs.
"""
import torch

torch.set_num_threads(1)
