"""Configs: every named config is complete and consistent; overrides are typed and errors name the closest keys."""
import json

import pytest

import solvers
from sde_diffusion import configs, sdes
from sde_diffusion.run.sampling import sampler_options


@pytest.mark.parametrize("name", configs.CONFIG_NAMES)
def test_named_configs_are_complete(name):
    c = configs.get_config(name)
    for section in ("training", "sampling", "data", "model", "optim", "eval"):
        assert section in c
    if name.endswith("_cond"):     # class-conditional: labels dropped for classifier-free guidance
        assert c.model.num_classes == 10 and 0.0 < c.training.p_uncond < 1.0
    else:
        assert c.model.num_classes == 0 and c.training.p_uncond == 0.0
    assert c.sampling.method in solvers.available() and c.sampling.num_steps >= 1
    assert set(sampler_options(c)) <= set(solvers.get_sampler(c.sampling.method).options)
    assert c.model.parameterization in ("noise", "score", "direct", "x0", "v", "velocity")
    assert isinstance(configs.build_sde(c), sdes.SDE)


@pytest.mark.parametrize("name,sde", [("vp_cifar", sdes.VPSDE), ("subvp_cifar", sdes.SubVPSDE),
                                      ("ve_cifar", sdes.VESDE)])
def test_cifar_configs_have_the_published_hyperparameters(name, sde):
    c = configs.get_config(name)
    assert isinstance(configs.build_sde(c), sde)
    assert c.optim.optimizer == "adam" and c.optim.lr == 2e-4 and c.optim.warmup == 5000
    assert c.optim.grad_clip == 1.0 and c.training.batch_size == 128 and c.model.ema_rate == 0.9999
    assert c.training.n_iters >= 1_300_000
    assert c.data.dataset == "cifar10" and c.data.image_size == 32 and c.data.random_flip


def test_overrides_are_typed():
    c = configs.get_config("vp_digits")
    configs.apply_overrides(c, ["training.batch_size=8", "optim.lr=1e-3", "data.centered=false",
                                "model.ch_mult=(1,2,2)", "sampling.method=ode", "training.n_iters=2e3",
                                "model.attn_resolutions=()"])
    assert c.training.batch_size == 8 and isinstance(c.training.batch_size, int)
    assert c.optim.lr == 1e-3 and c.data.centered is False and tuple(c.model.ch_mult) == (1, 2, 2)
    assert c.sampling.method == "ode" and c.training.n_iters == 2000 and tuple(c.model.attn_resolutions) == ()
    configs.apply_overrides(c, {"config.optim.lr": 3e-4, "training.eps": 1})     # int accepted for a float
    assert c.optim.lr == 3e-4 and c.training.eps == 1.0


@pytest.mark.parametrize("override,pattern", [
    ("training.batchsize=8", r"unknown config key 'training.batchsize'.*training.batch_size"),
    ("trainin.batch_size=8", r"unknown config key.*Closest valid keys: training.batch_size"),
    ("training.batch_size=eight", r"'training.batch_size' expects an int"),
    ("training.batch_size=1.5", r"expects an int"),
    ("data.centered=maybe", r"expects a bool"),
    ("optim.lr=fast", r"expects a float"),
    ("model.ch_mult=(1,x)", r"expects an int"),
    ("model=3", r"is a section"),
    ("training.batch_size", r"key=value"),
])
def test_override_errors_are_clear(override, pattern):
    with pytest.raises(configs.ConfigError, match=pattern):
        configs.apply_overrides(configs.get_config("vp_digits"), [override])


def test_unknown_config_name_suggests(tmp_path):
    with pytest.raises(configs.ConfigError, match="vp_digits"):
        configs.get_config("vp_digit")
    with pytest.raises(configs.ConfigError, match="does not exist"):
        configs.get_config(str(tmp_path / "missing.py"))


def test_config_from_python_file_and_json(tmp_path):
    f = tmp_path / "my.py"
    f.write_text("from sde_diffusion.configs.toy_2d import get_config as base\n"
                 "def get_config():\n    c = base()\n    c.training.n_iters = 7\n    return c\n")
    c = configs.get_config(str(f))
    assert c.training.n_iters == 7
    j = tmp_path / "c.json"
    j.write_text(configs.get_config("vp_cifar").to_json())
    c2 = configs.get_config(str(j))
    assert json.loads(c2.to_json()) == json.loads(configs.get_config("vp_cifar").to_json())
    configs.apply_overrides(c2, ["model.ch_mult=1,2"])
    assert list(c2.model.ch_mult) == [1, 2]


def test_configs_are_fresh_and_locked():
    a = configs.get_config("toy_2d")
    a.training.n_iters = 1
    assert configs.get_config("toy_2d").training.n_iters != 1
    with pytest.raises(AttributeError):
        a.training.n_iter = 3                                              # typo -> error, not a new key
