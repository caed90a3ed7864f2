"""Crash-safe replacement of a dataset directory: the hidden siblings a write uses, and recovery.

A write (`Claim`) builds in hidden siblings named `.{name}.{build|tmp|old}-{host}-{pid}-{tag}` and
renames the finished copy into place; an overwrite first moves the old copy aside. `META_FILE` inside
a directory marks it complete (it is written last and deleted first). `recover` cleans up after
writers that were killed: it restores a replaced copy and drops the rest, once no live process owns
them. A writer holds an exclusive `flock` on its `.{name}.lock-...` sibling for the whole write; the
kernel drops it when the process dies, so the lock, not the pid, says whether a writer is alive: a
pid means nothing across PID namespaces (two containers on one host can share a hostname). Only the
trace format (traces.py) uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from .atomic import swap_into_place

try:
    import fcntl
except ImportError:  # Windows: no flock; liveness falls back to the pid check
    fcntl = None

META_FILE = "trace_meta.json"
HIDDEN_KINDS = ("build", "tmp", "old")  # datasets cache, finished copy before the rename, replaced copy

log = logging.getLogger(__name__)
LOCK_KIND = "lock"  # the file a live writer holds locked
_ACTIVE: set[str] = set()  # tags of the writes running in this process (their siblings are live)


class Claim:
    """The hidden siblings (`build`, `tmp`, `trash`) of one write of `path`, live until `release`."""

    def __init__(self, path: Path):
        self.tag = uuid.uuid4().hex[:8]
        self.build, self.tmp, self.trash = (_sibling(path, kind, self.tag) for kind in HIDDEN_KINDS)
        self._lock, self._fd = _sibling(path, LOCK_KIND, self.tag), None
        if fcntl is not None:
            self._fd = _held_lock(self._lock)  # before any sibling exists
        _ACTIVE.add(self.tag)  # from here on our siblings are live: `recover` leaves them alone
        self._open = True

    def release(self) -> None:
        """Drop what is left of `build` and `tmp`, then the lock (the caller has moved `tmp` into place)."""
        if not self._open:
            return
        self._open = False
        shutil.rmtree(self.build, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        _ACTIVE.discard(self.tag)
        if self._fd is not None:
            self._lock.unlink(missing_ok=True)
            os.close(self._fd)  # releases the flock


def _held_lock(lock: Path) -> int | None:
    """An open descriptor holding an exclusive flock on the file at `lock`, created for it; None on a
    filesystem without locks (ENOLCK: no file is left, others check the pid). A recoverer that found
    the file between its creation and the flock took it for a dead writer's and unlinked it: the lock
    is taken again on a new file until the one held is the one at `lock`."""
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            lock.unlink(missing_ok=True)
            os.close(fd)
            return None
        try:
            there = os.stat(lock, follow_symlinks=False)
        except FileNotFoundError:
            there = None
        mine = os.fstat(fd)
        if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


def check_target(path: str | Path, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Raise unless `write_traces(path, overwrite=overwrite)` may write there; call it before long work.
    `flag`: how the caller's user asks to overwrite (a CLI's `--overwrite`, Hydra's `overwrite=true`).

    Leftovers of killed writes are recovered first. Overwrite replaces only a trace set (a directory
    with trace_meta.json) or an empty directory: anything else at `path` is not ours to delete.
    """
    path = Path(path)
    recover(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass {flag} to replace it")
    if path.is_symlink():
        raise ValueError(f"refusing to overwrite {path}: it is a symlink; remove it or write to its target")
    if not path.is_dir():
        raise ValueError(f"refusing to overwrite {path}: it is a file, not a trace dataset directory")
    if not _is_trace_set(path) and any(path.iterdir()):
        raise ValueError(
            f"refusing to overwrite {path}: not a trace dataset (a readable {META_FILE}, its .arrow shards and "
            ".json files, nothing else) and not empty; remove it yourself or choose another path"
        )


def _is_trace_set(path: Path) -> bool:
    """A directory a trace-set write made: its meta file reads as a JSON object, it holds Arrow shards, and
    nothing but them and .json files (so an overwrite deletes nothing a user put there)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    entries = list(path.iterdir())
    return (isinstance(meta, dict) and any(e.name.startswith("data-") and e.suffix == ".arrow" for e in entries)
            and all(e.is_file() and e.suffix in (".arrow", ".json") for e in entries))  # fmt: skip


def _move_into_place(tmp: Path, path: Path, trash: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `path`; an existing dataset is moved to `trash` and then deleted.

    If this process is interrupted between the two renames the old dataset is moved back; if it is
    killed there, `recover` moves it back on the next write or load.
    """
    if path.exists() or path.is_symlink():
        check_target(path, overwrite)  # again: the directory may have changed while we were writing
    try:
        moved = swap_into_place(tmp, path, trash)
    except OSError:
        if trash.exists() and not path.exists():  # the move back failed too
            log.error("could not move %s back to %s; the next write or load retries", trash, path)
        raise
    if moved:
        _remove_tree(trash)


def _host() -> str:
    """Short id of this machine, so a pid is only ever checked on the host that wrote it."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _sibling(path: Path, kind: str, tag: str, pid: int | None = None, host: str | None = None) -> Path:
    """The hidden sibling of `path` a write uses (`kind` in HIDDEN_KINDS), owned by `pid` on `host`."""
    return path.parent / f".{path.name}.{kind}-{host or _host()}-{pid or os.getpid()}-{tag}"


def _owned_siblings(path: Path) -> list[tuple[str, Path, bool]]:
    """(kind, sibling, stale) for every hidden sibling of `path` our writer's naming pattern matches.

    Stale means no live process owns it: written on this host by a write whose lock file nobody holds
    (or, without a lock file, by a pid that is gone), or by this process outside a running write.
    Siblings from other hosts are never stale (we cannot check).
    """
    kinds = "|".join((*HIDDEN_KINDS, LOCK_KIND))
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({kinds})-([0-9a-f]{{6}})-(\d+)-([0-9a-f]{{8}})")
    if not path.parent.is_dir():
        return []
    out, me, held_by = [], _host(), {}  # held_by: each write's lock, asked once for all its siblings
    for entry in path.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and not entry.is_symlink():
            kind, host, pid, tag = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if host == me and (pid, tag) not in held_by:
                held_by[pid, tag] = _lock_held(_sibling(path, LOCK_KIND, tag, pid, host))
            held = held_by.get((pid, tag))
            if host != me or held:  # a live writer: ours, or one whose pid we may not see
                stale = False
            elif pid == os.getpid():  # (or another PID namespace's writer with our pid, dead: its lock is free)
                stale = tag not in _ACTIVE
            elif held is not None:
                stale = True
            else:  # a write from before lock files, one whose lock is already gone, or no flock here
                stale = not _pid_alive(pid)
            out.append((kind, entry, stale))
    return out


def _lock_held(lock: Path) -> bool | None:
    """Whether a live process holds `lock`; None when there is no lock file to ask, or no answer (no
    flock here, or an error other than a conflict). A shared lock conflicts with the writer's exclusive
    one, needs only read access (another user's lock is read too; NFS emulates flock with POSIX locks,
    whose exclusive kind needs a writable descriptor) and lets two recoverers probe at once."""
    if fcntl is None or lock.is_symlink():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK / EAGAIN: its writer is alive
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # also releases the lock if we got it
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def recover(path: str | Path) -> None:
    """Clean up after writers of `path` that were killed: restore a replaced dataset, drop temp folders.

    If `path` is missing and a complete `.old-*` copy (one with trace_meta.json) is left, a kill hit
    between the two renames of an overwrite: that copy is renamed back to `path`. Every other stale
    sibling of our naming pattern is deleted. Folders owned by a live process are left alone.
    """
    path = Path(path)
    stale = [(kind, entry) for kind, entry, dead in _owned_siblings(path) if dead]
    if not stale:
        return
    if not (path.exists() or path.is_symlink()):
        olds = [e for kind, e in stale if kind == "old" and (e / META_FILE).is_file()]
        if olds:
            best = max(olds, key=lambda e: (e / META_FILE).stat().st_mtime)
            try:
                os.replace(best, path)
                log.warning("restored %s from %s, left by an interrupted overwrite", path, best.name)
            except OSError as e:  # another process restored it first
                log.warning("could not restore %s from %s: %s", path, best, e)
    for kind, entry in sorted(stale, key=lambda s: s[0] == LOCK_KIND):  # lock files last
        if kind == LOCK_KIND:
            entry.unlink(missing_ok=True)
        elif entry.exists():
            _remove_tree(entry)
            log.info("removed %s, left by an interrupted write of %s", entry, path)


def _remove_tree(path: Path) -> None:
    """Delete a hidden copy, trace_meta.json first, so a half-deleted copy never looks complete."""
    try:
        (path / META_FILE).unlink(missing_ok=True)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)
