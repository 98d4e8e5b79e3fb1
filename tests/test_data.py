"""Data: the digits split, CIFAR-10 from a tiny tarball in the official format (and its failure modes), toy data,
reproducible batches."""
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from sde_diffusion import configs, data


# ------------------------------------------------------------------------------------------------ digits
def test_digits_split_is_the_documented_permutation():
    from sklearn.datasets import load_digits
    d = load_digits()
    perm = np.random.RandomState(0).permutation(1797)
    xtr, ytr = data.load_digits_split("train")
    xte, yte = data.load_digits_split("test")
    assert xtr.shape == (1617, 1, 8, 8) and xte.shape == (180, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    np.testing.assert_array_equal(xtr[:, 0].numpy() * 16, d.images[perm[:1617]])
    np.testing.assert_array_equal(yte.numpy(), d.target[perm[1617:]])
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    with pytest.raises(ValueError):
        data.load_digits_split("val")


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    x, y = data.load_digits_split("train")
    ds = data.ArrayDataset(x, y, levels=17)
    a, b = ds.batch(7, 100, seed=3), ds.batch(7, 100, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(ds.batch(8, 100, seed=3)[0], a[0])
    assert not torch.equal(ds.batch(7, 100, seed=4)[0], a[0])
    per_epoch = 1617 // 100
    idx = torch.cat([ds.indices(s, 100, seed=3) for s in range(per_epoch)])
    assert idx.unique().numel() == idx.numel() == per_epoch * 100          # no repeats within an epoch
    nxt = torch.cat([ds.indices(s, 100, seed=3) for s in range(per_epoch, 2 * per_epoch)])
    assert not torch.equal(idx, nxt)                                      # a fresh permutation per epoch
    loader = ds.loader(100, seed=3, start_step=7)
    assert torch.equal(next(loader)[0], a[0])


def test_flip_and_dequantisation():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).reshape(2, 1, 2, 3) * 10
    y = torch.zeros(2, dtype=torch.long)
    flips = data.ArrayDataset(x, y, random_flip=True)
    seen = set()
    for step in range(20):
        xb, _ = flips.batch(step, 2, seed=0)
        for img in xb:
            match = [j for j in range(2) if torch.equal(img, x[j].float() / 255)]
            flipped = [j for j in range(2) if torch.equal(img, x[j].float().flip(-1) / 255)]
            assert match or flipped
            seen.add(bool(flipped))
    assert seen == {True, False}
    deq = data.ArrayDataset(x, y, uniform_dequantization=True)
    xb, _ = deq.batch(0, 2, seed=0)
    idx = deq.indices(0, 2, seed=0)
    k = x[idx].float()
    assert ((xb * 256 >= k) & (xb * 256 < k + 1)).all()                  # (k + u) / 256, u in [0, 1)
    assert not torch.equal(xb, k / 256)


def test_scalers_round_trip():
    c = configs.get_config("vp_digits")
    x = torch.rand(4, 1, 8, 8)
    s = data.get_data_scaler(c)(x)
    assert float(s.min()) >= -1 and float(s.max()) <= 1
    torch.testing.assert_close(data.get_data_inverse_scaler(c)(s), x)
    configs.apply_overrides(c, {"data.centered": False})
    assert torch.equal(data.get_data_scaler(c)(x), x)


# ------------------------------------------------------------------------------------------------ toy
def test_toy_targets_are_analytic_where_they_should_be():
    for name in ("ring", "bimodal", "trimodal"):
        assert data.get_toy_target(name) is not None
    assert data.get_toy_target("moons") is None and data.get_toy_target("checkerboard") is None
    ring = data.get_toy_target("ring")
    x = data.sample_toy("ring", 20_000, torch.Generator().manual_seed(0)).double()
    r = x.norm(dim=1)
    assert abs(float(r.mean()) - 1.0) < 0.02                             # eight modes on the unit circle
    assert float(ring.log_prob(x).mean()) > float(ring.log_prob(torch.randn(2000, 2, dtype=torch.float64)).mean())


def test_checkerboard_and_moons_shapes():
    cb = data.sample_toy("checkerboard", 5000, torch.Generator().manual_seed(0)) * 2
    assert cb.shape == (5000, 2) and cb.abs().max() <= 2
    parity = (torch.floor(cb[:, 0]) + torch.floor(cb[:, 1])) % 2
    assert (parity == 0).all()                                           # only the black squares
    m = data.sample_toy("moons", 5000, torch.Generator().manual_seed(0))
    assert m.shape == (5000, 2) and torch.isfinite(m).all()
    with pytest.raises(ValueError, match="unknown toy"):
        data.sample_toy("spiral", 10)


def test_toy_dataset_test_split_is_fixed_and_labels_are_zero():
    c = configs.get_config("toy_1d")
    ds = data.get_dataset(c, "test")
    a = torch.cat([x for x, _ in ds.iterate(1000)])
    b = torch.cat([x for x, _ in ds.iterate(3000)])
    assert torch.equal(a, b) and a.shape == (c.eval.num_samples, 1)
    x, y = data.get_dataset(c, "train").batch(0, 16)
    assert x.shape == (16, 1) and y.dtype == torch.int64 and (y == 0).all()


# ------------------------------------------------------------------------------------------------ CIFAR-10
def _batch_bytes(n, offset):
    rng = np.random.RandomState(offset)
    d = {b"data": rng.randint(0, 256, size=(n, 3072), dtype=np.uint8), b"labels": list(rng.randint(0, 10, n)),
         b"batch_label": b"x", b"filenames": [b"f"] * n}
    return pickle.dumps(d, protocol=2), d


def make_cifar_tarball(root, n=4, drop=None):
    """A tiny cifar-10-python.tar.gz in the official layout (pickled dicts with b'data' (N, 3072) and b'labels')."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "cifar-10-python.tar.gz")
    content = {}
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(list(data.CIFAR10_TRAIN_BATCHES) + ["test_batch", "batches.meta"]):
            if name == drop:
                continue
            raw, d = _batch_bytes(n, i)
            content[name] = d
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path, content


def md5_of(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_cifar10_from_tiny_tarball(tmp_path, monkeypatch):
    path, content = make_cifar_tarball(str(tmp_path))
    with pytest.raises(data.DatasetError, match=f"md5 {md5_of(path)}, expected {data.CIFAR10_MD5}"):
        data.load_cifar10(str(tmp_path), "train")               # a local archive is checked against the official md5
    monkeypatch.setattr(data, "CIFAR10_MD5", md5_of(path))      # ... so the tiny stand-in must declare its own
    x, y = data.load_cifar10(str(tmp_path), "train")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (20,)
    want = np.concatenate([content[n][b"data"] for n in data.CIFAR10_TRAIN_BATCHES]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(x.numpy(), want)
    # the first 1024 values of a row are the red channel, row-major (the official layout)
    assert int(x[0, 0, 0, 1]) == int(content["data_batch_1"][b"data"][0, 1])
    assert int(x[0, 1, 0, 0]) == int(content["data_batch_1"][b"data"][0, 1024])
    xt, yt = data.load_cifar10(str(tmp_path), "test")
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == list(content["test_batch"][b"labels"])
    c = configs.get_config("vp_cifar")
    configs.apply_overrides(c, {"data.root": str(tmp_path)})
    ds = data.get_dataset(c, "train")
    xb, yb = ds.batch(0, 8, seed=0)
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and 0 <= float(xb.min()) <= float(xb.max()) <= 1


def test_cifar10_extracted_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    raw, d = _batch_bytes(3, 9)
    (folder / "test_batch").write_bytes(raw)
    x, y = data.load_cifar10(str(tmp_path), "test")
    np.testing.assert_array_equal(x.reshape(3, -1).numpy(), d[b"data"])
    with pytest.raises(data.DatasetError, match="data_batch_1"):
        data.load_cifar10(str(tmp_path), "train")


def test_cifar10_missing_file_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(data.DatasetError) as e:
        data.load_cifar10(str(tmp_path / "nowhere"), "train")
    msg = str(e.value)
    assert os.path.join(str(tmp_path / "nowhere"), "cifar-10-python.tar.gz") in msg
    assert data.CIFAR10_URL in msg and data.CIFAR10_MD5 in msg and "data.download" in msg


def test_cifar10_truncated_and_corrupt_tarballs(tmp_path):
    path, _ = make_cifar_tarball(str(tmp_path / "a"), n=50)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])                                     # truncated download
    with pytest.raises(data.DatasetError, match="corrupt or truncated"):
        data.load_cifar10(str(tmp_path / "a"), "train")                   # caught by the md5 ...
    with pytest.raises(data.DatasetError, match="corrupt or truncated"):
        data.load_cifar10(str(tmp_path / "a"), "train", md5=md5_of(path))  # ... and by the reader
    os.makedirs(tmp_path / "b")
    bad = tmp_path / "b" / "cifar-10-python.tar.gz"
    bad.write_bytes(b"this is not a tarball" * 100)
    with pytest.raises(data.DatasetError, match="corrupt or truncated"):
        data.load_cifar10(str(tmp_path / "b"), "test", md5=md5_of(bad))
    path, _ = make_cifar_tarball(str(tmp_path / "c"), drop="data_batch_3")
    with pytest.raises(data.DatasetError, match="data_batch_3"):
        data.load_cifar10(str(tmp_path / "c"), "train", md5=md5_of(path))


class _Payload:
    """Unpickling this calls os.system: what a crafted archive would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_batches_cannot_run_code(tmp_path):
    """A batch whose pickle calls os.system (a marker file would appear) is refused before the call, from a folder and
    from a tarball with a matching md5; the official batches' numpy arrays and numpy scalars still load."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "f" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    d = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2], b"x": _Payload(str(marker))}
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(data.DatasetError, match=r"global (posix|os)\.system is not allowed"):
        data.load_cifar10(str(tmp_path / "f"), "test")
    raw = pickle.dumps(d, protocol=2)
    root = tmp_path / "t"
    root.mkdir()
    tar_path = root / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in ["test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(data.DatasetError, match="md5"):
        data.load_cifar10(str(root), "test")                  # the official md5 refuses it first
    with pytest.raises(data.DatasetError, match="is not allowed"):
        data.load_cifar10(str(root), "test", md5=md5_of(tar_path))
    assert not marker.exists()
    for protocol in (2, 4, 5):                                # numpy 2 arrays and scalars under every protocol
        ok = {b"data": np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072),
              b"labels": [np.int64(3), 4], b"batch_label": b"b", b"filenames": [b"a", b"b"]}
        back = data.restricted_loads(pickle.dumps(ok, protocol=protocol))
        np.testing.assert_array_equal(back[b"data"], ok[b"data"])
        assert back[b"labels"] == [3, 4]


def test_cifar10_corrupt_pickle(tmp_path):
    os.makedirs(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"labels": [1]}))
    with pytest.raises(data.DatasetError, match="corrupt"):
        data.load_cifar10(str(tmp_path), "test")


def test_cifar10_download_checks_md5(tmp_path):
    src, _ = make_cifar_tarball(str(tmp_path / "src"))
    url = "file://" + src
    md5 = hashlib.md5(open(src, "rb").read()).hexdigest()
    with pytest.raises(data.DatasetError, match="md5"):
        data.download_cifar10(str(tmp_path / "bad"), url=url)            # the official md5 does not match
    assert os.listdir(tmp_path / "bad") == []                             # nothing half-written is left
    path = data.download_cifar10(str(tmp_path / "good"), url=url, md5=md5)
    assert open(path, "rb").read() == open(src, "rb").read()
    x, _ = data.load_cifar10(str(tmp_path / "good"), "test", md5=md5)
    assert x.shape == (4, 3, 32, 32)
    with pytest.raises(data.DatasetError, match="could not download"):
        data.download_cifar10(str(tmp_path / "missing"), url="file://" + str(tmp_path / "no.tar.gz"))


def test_mix_seed_is_stable_and_spreads():
    assert data.mix_seed(1, 2) == data.mix_seed(1, 2)
    assert len({data.mix_seed(0, s) for s in range(1000)}) == 1000
    assert 0 <= data.mix_seed(2 ** 70, -5) < 2 ** 63
