"""Atomic file writes: every output file is written to a temporary sibling and renamed over the target
only when complete.

Why: a run killed mid-write or a disk that fills up leaves the previous file (or none), never a truncated
one that a later step would read as whole. The rename is `os.replace` within one directory, which is
atomic on POSIX; the temporary is fsynced first, so the new name never points at unwritten data.

    with atomic_path("plot.png") as tmp:   # tmp = ".plot.tmp-1a2b3c4d.png": the suffix is kept, so
        fig.savefig(tmp)                   # savefig, safetensors, numpy... still see the format
    write_text_atomic(path, text)
    write_json_atomic(path, data)
    swap_into_place(new_dir, path, trash)  # a finished folder onto `path`; the old one kept at `trash`

On an exception inside the block the temporary is removed and the target is left untouched.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)  # read once, at import (setting it is the only way to read it)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` (same directory and suffix) to write; renamed onto `path` when the
    block exits without error, removed otherwise. The block must create the file."""
    path = Path(path)
    if path.is_symlink():  # write through it, as open() would: the link stays, its target is replaced
        path = path.resolve()
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # durable before it becomes visible under the real name
            os.fsync(f.fileno())
        # an existing file keeps its mode (a 0600 file stays private); a new one gets what a plain open()
        # would give it (safetensors writes owner-only files)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`Path(path).write_text(text)` (UTF-8), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2, **dumps_kwargs) -> None:
    """`data` as JSON (`json.dumps(data, indent=indent, **dumps_kwargs)`) at `path`, atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent, **dumps_kwargs))


def swap_into_place(new: Path, path: Path, trash: Path) -> bool:
    """Rename the finished folder (or file) `new` to `path`. Whatever `path` held is first renamed to
    `trash`, which the caller deletes; if the second rename fails it is moved back, so `path` holds the
    old or the new, never nothing. Returns whether `trash` now holds the old one."""
    if not os.path.lexists(path):
        os.replace(new, path)
        return False
    try:
        os.replace(path, trash)
        os.replace(new, path)
    except BaseException:  # (a Ctrl-C between the two renames too: the file system says where things are)
        if os.path.lexists(trash) and not os.path.lexists(path):
            try:
                os.replace(trash, path)
            except OSError as e:
                raise OSError(f"{path} could not be put back: it is at {trash} ({e})") from e
        raise
    return True
