"""``sampling.autocast``: the network's calls under ``torch.autocast`` (bf16 on CPU or CUDA, fp16 on CUDA), the solver in
float32.  Checked against the float32 sampling of the same network, seed and grid: bf16 keeps 8 mantissa bits
(relative rounding 2^-9 per op), so ten DDIM steps through a U-Net move the samples by at most a few 1e-3 in [0, 1];
the test allows 0.03 and asks for a non-zero difference (autocast really ran), bf16 outputs inside the network, float32
samples, and the network's own ``forward`` back after sampling."""
from __future__ import annotations

import pytest
import torch

from sde_diffusion import configs
from sde_diffusion.networks import get_network
from sde_diffusion.run.sampling import SamplingError, generate


def _setup(**sampling):
    config = configs.get_config("vp_digits")
    config.model.nf = 16
    config.model.num_res_blocks = 1
    config.sampling.method = "ddim"
    config.sampling.num_steps = 10
    for k, v in sampling.items():
        config.sampling[k] = v
    torch.manual_seed(0)
    model = get_network(config).eval()
    return config, configs.build_sde(config), model


def test_bf16_sampling_is_the_float32_sampling_within_bf16_rounding():
    config, sde, model = _setup()
    with torch.no_grad():
        ref = generate(config, sde, model, num_samples=8, batch_size=8, seed=3)["samples"]
        config.sampling.autocast = "bf16"
        dtypes = []
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        hook = conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        try:
            low = generate(config, sde, model, num_samples=8, batch_size=8, seed=3)["samples"]
        finally:
            hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    assert low.dtype == torch.float32 and low.shape == ref.shape == (8, 1, 8, 8)
    diff = (low - ref).abs().max().item()
    assert 0 < diff <= 0.03, diff
    assert "forward" not in model.__dict__            # the network's own forward is back
    out = model(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5))
    assert out.dtype == torch.float32


def test_fp16_on_cpu_and_unknown_values_are_one_line():
    config, sde, model = _setup(autocast="fp16")
    with pytest.raises(SamplingError, match="sampling.autocast=fp16 needs a CUDA device; use bf16 on a CPU"):
        generate(config, sde, model, num_samples=2, batch_size=2)
    from sde_diffusion.configs import validation
    config.sampling.autocast = "fp8"
    with pytest.raises(configs.ConfigError, match="config key 'sampling.autocast' must be one of none, bf16, fp16, "
                                                  "got 'fp8'"):
        validation.validate(config, "sample")
