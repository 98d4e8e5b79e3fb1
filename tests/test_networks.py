"""Score networks: embeddings, shapes, label conditioning, output parameterisations, the vp_cifar U-Net size."""

import pytest
import torch

from sde_diffusion import configs, networks
from sde_diffusion.networks.layers import GaussianFourierProjection, sinusoidal_embedding
from sde_diffusion.sdes import VESDE, VPSDE


def small_unet_config(**over):
    c = configs.get_config("vp_digits")
    configs.apply_overrides(c, {"model.nf": 16, "model.num_res_blocks": 1, **over})
    return c


def test_sinusoidal_embedding_matches_formula():
    t = torch.tensor([0.0, 1.0, 250.5])
    emb = sinusoidal_embedding(t, 8)
    w = torch.tensor([10000 ** (-k / 3) for k in range(4)])
    expected = torch.cat([torch.sin(t[:, None] * w), torch.cos(t[:, None] * w)], 1)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)


def test_fourier_features_are_fixed_buffer():
    proj = GaussianFourierProjection(16, scale=16.0)
    assert not list(proj.parameters()) and "W" in proj.state_dict()
    out = proj(torch.tensor([0.0, 0.3]))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out[0], torch.cat([torch.zeros(8), torch.ones(8)]))


@pytest.mark.parametrize("name", ["toy_2d", "toy_1d"])
def test_mlp_shapes_and_zero_init(name):
    c = configs.get_config(name)
    net = networks.get_network(c)
    x = torch.randn(5, c.data.dim)
    out = net(x, torch.rand(5))
    assert out.shape == x.shape
    assert out.abs().max() < 1e-4       # (near-)zero-initialised output layer


@pytest.mark.parametrize("resblock", ["ddpm", "biggan"])
def test_unet_shapes(resblock):
    c = small_unet_config(**{"model.resblock_type": resblock, "model.init_scale": 1.0})
    net = networks.get_network(c)
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unet_rejects_bad_resolution():
    c = small_unet_config(**{"model.ch_mult": (1, 2, 2, 2, 2)})    # 8 is not divisible by 2^4
    with pytest.raises(ValueError, match="divisible"):
        networks.get_network(c)


def test_label_conditioning_and_null_label():
    c = small_unet_config(**{"model.num_classes": 10, "model.init_scale": 1.0})
    net = networks.get_network(c).eval()
    torch.manual_seed(0)
    with torch.no_grad():   # leave the zero-initialised start, where conditioning cannot show yet
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    emb = net.time_embed.label_embed
    assert emb.num_embeddings == 11                            # 10 classes + the null label
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.no_grad():
        none = net(x, t)
        null = net(x, t, torch.full((4,), 10))
        y3 = net(x, t, torch.full((4,), 3))
        y3_scalar = net(x, t, torch.tensor(3))
    torch.testing.assert_close(none, null)
    torch.testing.assert_close(y3, y3_scalar)
    assert (y3 - none).abs().max() > 1e-4
    with pytest.raises(ValueError, match="labels"):
        net(x, t, torch.full((4,), 11))


def test_unconditional_network_rejects_labels():
    net = networks.get_network(configs.get_config("toy_2d"))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 2), torch.rand(2), torch.zeros(2, dtype=torch.long))


class _Constant(torch.nn.Module):
    """A fake network whose output is a fixed tensor: the parameterisations are then plain arithmetic."""

    def __init__(self, value, parameterization):
        super().__init__()
        self.value = value
        self.parameterization = parameterization
        self.seen_y = None

    def forward(self, x, t, y=None):
        self.seen_y = y
        return self.value.expand_as(x)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()])
def test_score_parameterizations(sde):
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    std = sde.marginal_coeffs(t)[1][:, None]
    out = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    expected = {"noise": -out / std, "score": out / std, "direct": out.expand(3, 2)}
    for param, want in expected.items():
        score_fn = networks.get_score_fn(sde, _Constant(out, param))
        torch.testing.assert_close(score_fn(x, t), want)
        # the noise prediction is the same quantity seen from the other side: eps_hat = -std * score
        noise_fn = networks.get_noise_fn(_Constant(out, param))
        torch.testing.assert_close(noise_fn(x, t, std[:, 0]), -std * want)


def test_get_score_fn_passes_labels():
    model = _Constant(torch.zeros(1, 2), "noise")
    score_fn = networks.get_score_fn(VPSDE(), model, y=torch.tensor([1, 2, 3]))
    score_fn(torch.randn(3, 2), torch.rand(3))
    assert model.seen_y.tolist() == [1, 2, 3]
    score_fn = networks.get_score_fn(VPSDE(), model, y=7)
    score_fn(torch.randn(2, 2), torch.rand(2))
    assert model.seen_y.tolist() == [7, 7]
    with pytest.raises(ValueError, match="labels for a batch"):
        networks.get_score_fn(VPSDE(), model, y=torch.tensor([1, 2]))(torch.randn(3, 2), torch.rand(3))


def test_registry():
    assert {"mlp", "unet"} <= set(networks.available_networks())
    with pytest.raises(ValueError, match="already registered"):
        networks.register_network("mlp")(torch.nn.Module)
    c = configs.get_config("toy_2d")
    configs.apply_overrides(c, {"model.name": "nope"})
    with pytest.raises(ValueError, match="unknown network"):
        networks.get_network(c)
    c = configs.get_config("toy_2d")
    configs.apply_overrides(c, {"model.parameterization": "epsilon"})
    with pytest.raises(ValueError, match="parameterization"):
        networks.get_network(c)


def test_vp_cifar_unet_is_ddpm_size_and_trains_on_cpu():
    """DDPM's CIFAR-10 model has 35.7 M parameters (Ho et al. 2020); forward + backward at batch 2 on the CPU."""
    c = configs.get_config("vp_cifar")
    net = networks.get_network(c)
    n = networks.count_parameters(net)
    assert 35.0e6 < n < 36.5e6, n
    x = torch.randn(2, 3, 32, 32)
    out = net(x, torch.rand(2))
    assert out.shape == x.shape
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
