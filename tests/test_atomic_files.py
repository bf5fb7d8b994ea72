import os
import stat
from pathlib import Path

import numpy as np
import pytest

from trainer.base import atomic_files
from trainer.base.atomic_files import atomic_path, atomic_write_bytes, remove_temporaries


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"first")
    atomic_write_bytes(tmp_path / "a.bin", b"second")
    assert (tmp_path / "a.bin").read_bytes() == b"second"
    assert _leftovers(tmp_path) == []


def test_crash_before_rename_keeps_previous_version(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_bytes(target, b"old")
    fresh = tmp_path / "fresh.bin"

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_bytes(target, b"new")
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_bytes(fresh, b"new")
    assert target.read_bytes() == b"old"
    assert not fresh.exists()
    assert _leftovers(tmp_path) == []


def test_written_files_get_the_mode_open_would_give_not_mkstemps_private_one(tmp_path):
    """Checkpoints, summaries and shared caches must be readable by the rest of a team, as any file the
    user's umask allows; mkstemp alone would leave them 0600."""
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with open(tmp_path / "plain.bin", "wb"):
        pass
    mode = stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.bin").st_mode)

    old = os.umask(0o077)
    atomic_files._file_mode.cache_clear()  # the umask is read once per process; re-read the new one
    try:
        atomic_write_bytes(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
        atomic_files._file_mode.cache_clear()
    assert stat.S_IMODE(os.stat(tmp_path / "private.bin").st_mode) == 0o600


def test_path_writers_accept_the_temporary_path(tmp_path):
    """numpy and open() write through the yielded Path; the result appears only under the final name."""
    array = np.arange(10, dtype=np.uint16)
    with atomic_path(tmp_path / "nested" / "tokens.bin") as tmp:
        assert tmp.parent == tmp_path / "nested" and tmp.name.startswith(".tokens.bin.")
        array.tofile(tmp)
    assert np.array_equal(np.fromfile(tmp_path / "nested" / "tokens.bin", dtype=np.uint16), array)
    assert _leftovers(tmp_path / "nested") == []


def test_remove_temporaries_takes_only_what_atomic_path_left(tmp_path, monkeypatch):
    with monkeypatch.context() as killed:  # a killed process never reaches atomic_path's unlink
        killed.setattr(Path, "unlink", lambda self, missing_ok=False: None)
        with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "train-00002.bin") as tmp:
            tmp.write_bytes(b"half a shard")
            raise KeyboardInterrupt
    kept = ["train-00001.bin", ".gitignore", ".notes", "notes.tmp"]
    for name in kept:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / ".cache.tmp").mkdir()  # a directory is never an atomic_path temporary

    assert remove_temporaries(tmp_path) == [tmp]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".cache.tmp"])
    assert remove_temporaries(tmp_path / "missing") == []
