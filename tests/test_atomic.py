"""Atomic writes: a failure leaves the previous file and no temporary file; success replaces it with normal permissions."""
import os
import stat

import numpy as np
import pytest

from sde_diffusion.atomic import atomic_path, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text("old", str(path))
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half written")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_suffix_lets_numpy_write_in_place_and_permissions_follow_the_umask(tmp_path):
    path = tmp_path / "sub" / "samples.npz"                 # the folder is created
    with atomic_path(str(path), suffix=".npz") as tmp:
        np.savez(tmp, x=np.arange(3))
    assert sorted(os.listdir(path.parent)) == ["samples.npz"]      # numpy wrote no second ".npz" file
    np.testing.assert_array_equal(np.load(path)["x"], np.arange(3))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
