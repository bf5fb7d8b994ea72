"""Files that appear whole or not at all: write under a temporary name, fsync, rename, fsync the directory.

Every artifact the project writes (checkpoints, snapshots, summaries, token shards, cached tokenizers)
goes through `atomic_path`, so all temporaries share one name pattern and `remove_temporaries` can sweep
what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

# ".<final name>.<random>.tmp": the leading dot keeps globs such as `ckpt-step-*.pt` or `*.bin` from ever
# seeing a half-written file.
TEMPORARY_NAME = re.compile(r"^\..+\.tmp$")


@functools.cache
def _file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask (mkstemp's 0o600 would hide checkpoints
    and shared caches from the rest of a team)."""
    try:  # Linux reports the umask without changing it; os.umask's set-and-restore races other threads
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms (Windows) that cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; once the block finishes, the file becomes `path` atomically.

    If the block (or the rename) raises, the temporary file is removed and any previous `path` is intact.
    The data is fsynced before the rename: otherwise a power loss can leave the new name pointing at an
    empty file, which a content-keyed cache would then trust forever.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _file_mode())
        yield tmp
        # fsync through a fresh descriptor: writers (torch.save, safetensors, numpy) close their own, and
        # fsync flushes the file's pages whichever descriptor wrote them.
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Without this the rename itself may be lost on power failure, leaving the old file (or none).
    fsync_directory(final.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete `atomic_path` temporaries directly inside `directory`; returns what was removed.

    A clean failure removes its own temporary, but SIGKILL, OOM kills and pre-emption run no cleanup. Only
    call this where no other process may be writing at the same time (a run directory at start, on one
    rank; a shard directory its writer owns), never on a cache shared by concurrent runs.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        if TEMPORARY_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
