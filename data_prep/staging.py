"""Prep jobs write into a staging directory and swap it in only when the new output is complete and verified.

A prepared directory therefore holds either what it held before the job, or the job's complete output: a job
that fails on bad input, is killed, or runs out of disk never touches it. The staging directory is a sibling of
the output directory (same filesystem, so the swap is a rename):

- a single run stages into ``.<name>.staging-<pid>`` and swaps it in at the end;
- the pieces of a job array share ``.<name>.staging`` (each writes its own shards and partial manifest) and
  ``data_prep.merge`` swaps it in once every piece is there.

The swap is one atomic ``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem offer it (Linux ext4, xfs,
btrfs, tmpfs), otherwise two renames; in that case a crash between them leaves the old output complete under
``.<name>.replaced-<pid>``. Files in the output directory that no prep job writes are carried over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
from pathlib import Path

_PREP_OUTPUT = re.compile(r".+\.tar(\.tmp)?$|manifest\.json(\.tmp)?$|manifest\.part-\d{4}-of-\d{4}\.json(\.tmp)?$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def output_dir(out_dir: str | Path) -> Path:
    """The directory a job writes: a symbolic link is followed, so the swap replaces its target, not the link."""
    path = Path(out_dir)
    return path.resolve() if path.is_symlink() else path.absolute()


def staging_dir(out_dir: str | Path, *, shared: bool) -> Path:
    """Where a job stages its output: per process for a single run, shared by the pieces of a job array."""
    out = output_dir(out_dir)
    suffix = "staging" if shared else f"staging-{os.getpid()}"
    return out.parent / f".{out.name}.{suffix}"


def is_prep_output(name: str) -> bool:
    """Shards, manifests and their temporary files: what a prep job owns in its output directory."""
    return bool(_PREP_OUTPUT.fullmatch(name))


def commit(staging: Path, out_dir: str | Path) -> None:
    """Replace ``out_dir`` by the complete ``staging`` directory, keeping files no prep job wrote."""
    out = output_dir(out_dir)
    if not out.exists():
        os.rename(staging, out)
        _fsync_dir(out.parent)
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    for entry in sorted(out.iterdir()):
        if not is_prep_output(entry.name) and not (staging / entry.name).exists():
            os.rename(entry, staging / entry.name)
    if _exchange(staging, out):
        shutil.rmtree(staging)  # now holds the old output
    else:
        replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.rename(out, replaced)
        os.rename(staging, out)
        shutil.rmtree(replaced)
    _fsync_dir(out.parent)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the platform or filesystem cannot."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
