"""Exported models (issue 16): our safetensors reader / writer against the real library both ways, its validation of
corrupt and malicious files, and ``--mode export`` -> ``--mode sample --config.model.source=export`` giving the same
samples as the workdir's checkpoint with the same seed."""
import json
import os
import struct

import numpy as np
import pytest
import torch

from sde_diffusion import safetensors_io as st
from sde_diffusion.run import export as export_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "w.f32": torch.randn(5, generator=g),
        "w.f16": torch.randn(2, 3, generator=g).half(),
        "w.bf16": torch.randn(4, 1, generator=g).bfloat16(),
        "i64": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3),
        "i32": torch.tensor([1, -2, 2 ** 30], dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),          # non-contiguous: written in row-major order
    }


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ the format
def test_our_files_read_by_safetensors_and_theirs_by_us(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    tensors, meta = _tensors(), {"format": "pt", "note": "ünïcode"}
    ours = str(tmp_path / "ours.safetensors")
    st.write(ours, tensors, meta)
    _same(tensors, safetensors_torch.load_file(ours))
    with safe_open(ours, framework="pt") as f:
        assert f.metadata() == meta
    theirs = str(tmp_path / "theirs.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, theirs, metadata=meta)
    got, got_meta = st.read(theirs)
    _same(tensors, got)
    assert got_meta == meta
    assert st.serialize({}, None) and st.deserialize(st.serialize({}))[0] == {}


def _file(header, data=b"", raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("buf,msg", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10 ** 9) + b"{}", "exceeds the 100000000-byte limit"),
    (struct.pack("<Q", 50) + b"{}", "does not fit the file"),
    (_file(None, raw_header=b"{\"a\": "), "not UTF-8 JSON"),
    (_file(None, raw_header=b"\xff\xfe{}"), "not UTF-8 JSON"),
    (_file([1, 2]), "not an object"),
    (_file(None, b"\0" * 8, raw_header=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                       b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'), "names 'a' twice"),
    (_file({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype 'F33'"),
    (_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "not a list of non-negative"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}, b"\0" * 8), "not [begin, end]"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8), "outside the data section"),
    (_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12 bytes but spans 8"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlaps"),
    (_file(GOOD, b"\0" * 12), "belong to no tensor"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "belong to no tensor"),
    (_file({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "exactly dtype, shape and data_offsets"),
    (_file(dict(GOOD, __metadata__={"k": 1}), b"\0" * 8), "__metadata__ is not an object of strings"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [True, 8]}}, b"\0" * 8), "not [begin, end]"),
])
def test_corrupt_or_malicious_files_give_one_clear_error(tmp_path, buf, msg):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(buf)
    with pytest.raises(st.SafetensorsError, match="is not a valid safetensors file") as e:
        st.read(str(path))
    assert msg in str(e.value) and str(path) in str(e.value)


def test_a_valid_minimal_file_and_header_padding_are_accepted():
    t, m = st.deserialize(_file(GOOD, struct.pack("<2f", 1.5, -2.0)))
    assert torch.equal(t["a"], torch.tensor([1.5, -2.0])) and m == {}
    raw = json.dumps(GOOD).encode() + b"   "                  # trailing spaces pad the header
    t, _ = st.deserialize(_file(None, struct.pack("<2f", 1.0, 2.0), raw_header=raw))
    assert torch.equal(t["a"], torch.tensor([1.0, 2.0]))
    with pytest.raises(st.SafetensorsError, match="cannot store"):
        st.serialize({"c": torch.zeros(2, dtype=torch.complex64)})


# ------------------------------------------------------------------------------------------------ export / sample
def _cli(*args):
    from sde_diffusion import cli
    return cli.cli(["main.py", *args])


SAMPLE = ["--config.sampling.method=ddim", "--config.sampling.num_steps=8", "--config.sampling.num_samples=64",
          "--config.sampling.batch_size=64", "--config.sampling.seed=3", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run") / "toy")
    code = _cli("--mode", "train", "--config", "toy_2d", "--workdir", wd, "--device", "cpu",
                "--config.training.n_iters=30", "--config.training.checkpoint_freq=15",
                "--config.training.batch_size=32", "--config.training.snapshot_freq=0",
                "--config.training.log_freq=10", "--config.training.progress=false")
    assert code == 0
    return wd


def test_export_then_sample_equals_the_checkpoint(trained, tmp_path, capsys):
    """``--mode export`` writes model.safetensors + config.json (the safetensors library reads the weights: the
    checkpoint's EMA tensors); sampling the export from an empty workdir equals sampling the checkpoint with the same
    seed, bit for bit; a second export into the same folder is refused unless --overwrite."""
    capsys.readouterr()
    assert _cli("--mode", "export", "--workdir", trained) == 0
    out = capsys.readouterr().out
    exp = os.path.join(trained, "export", "step_00000030")
    assert os.path.join(exp, "model.safetensors") in out and "step 30" in out
    from sde_diffusion.run.checkpoints import load_checkpoint, resolve_checkpoint
    ema = load_checkpoint(resolve_checkpoint(trained))["ema"]["model"]
    tensors, meta = st.read(os.path.join(exp, "model.safetensors"))
    _same(dict(ema), tensors)
    assert meta["step"] == "30" and meta["format"] == "sde_diffusion"
    safetensors_torch = pytest.importorskip("safetensors.torch")
    _same(dict(ema), safetensors_torch.load_file(os.path.join(exp, "model.safetensors")))

    assert _cli("--mode", "sample", "--workdir", trained, *SAMPLE) == 0
    ref = np.load(os.path.join(trained, "samples", "step_00000030", "samples.npz"))["samples"]
    other = str(tmp_path / "elsewhere")
    assert _cli("--mode", "sample", "--workdir", other, "--config.model.source=export",
                f"--config.model.path={exp}", *SAMPLE) == 0
    got = np.load(os.path.join(other, "samples", "export_step_00000030", "samples.npz"))["samples"]
    assert got.shape == (64, 2) and np.array_equal(got, ref)

    capsys.readouterr()
    assert _cli("--mode", "export", "--workdir", trained) == 1
    assert "already holds an export" in capsys.readouterr().err
    assert _cli("--mode", "export", "--workdir", trained, "--checkpoint", "15", "--out_dir", exp) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert _cli("--mode", "export", "--workdir", trained, "--checkpoint", "15", "--out_dir", exp, "--overwrite") == 0
    assert st.read(os.path.join(exp, "model.safetensors"))[1]["step"] == "15"


def test_damaged_or_mismatched_exports_are_refused(trained, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    export_lib.export_model(trained, checkpoint=15, out_dir=a)
    export_lib.export_model(trained, checkpoint=30, out_dir=b)
    config, sde, net = export_lib.load_export(a)
    assert net.checkpoint_step == 15 and not any(p.requires_grad for p in net.parameters())
    w = os.path.join(a, "model.safetensors")
    buf = bytearray(open(w, "rb").read())
    buf[-3] ^= 0x40                                          # one bit of the last tensor
    open(w, "wb").write(bytes(buf))
    with pytest.raises(export_lib.ExportError, match="damaged"):
        export_lib.load_export(a)
    with open(os.path.join(b, "config.json"), "a") as f:
        f.write(" ")
    with pytest.raises(export_lib.ExportError, match="not the config exported"):
        export_lib.load_export(b)
    os.remove(os.path.join(b, "config.json"))
    with pytest.raises(export_lib.ExportError, match="not a complete export"):
        export_lib.load_export(b)
    with pytest.raises(export_lib.ExportError, match="neither an export folder"):
        export_lib.load_export(str(tmp_path / "none"))
