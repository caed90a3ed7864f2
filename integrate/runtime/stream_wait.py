"""A POSIX unnamed semaphore that a CUDA stream can wait on: the stream runs libc's `sem_wait` as a host
function (the driver's `cuLaunchHostFunc`), so no Python and no GIL run on the driver's thread, and the
work queued after it waits until someone posts (hybrid's pool, host_pool.py). Linux only."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

import torch

_libc = ctypes.CDLL(None, use_errno=True)


class Semaphore:
    """A POSIX unnamed semaphore in memory of our own, so that a CUDA host function can wait on it."""

    def __init__(self):
        self._mem = (ctypes.c_long * 8)()  # sem_t is 32 bytes on Linux (x86-64, aarch64), 8-byte aligned
        if _libc.sem_init(self._mem, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init: hybrid='pool' needs POSIX unnamed semaphores (Linux)")

    def post(self) -> None:
        _libc.sem_post(self._mem)

    def wait(self) -> None:
        while _libc.sem_wait(self._mem) != 0:  # ctypes drops the GIL while it blocks
            if (err := ctypes.get_errno()) != errno.EINTR:
                raise OSError(err, "sem_wait")

    def value(self) -> int:
        v = ctypes.c_int()
        _libc.sem_getvalue(self._mem, ctypes.byref(v))
        return v.value


def stream_waiter() -> Callable[[torch.cuda.Stream, Semaphore], None]:
    """`wait(stream, sem)`: the stream runs `sem_wait(sem)` on the driver's host-function thread when it
    gets there, and nothing after it until the semaphore is posted."""
    try:
        launch = ctypes.CDLL("libcuda.so.1").cuLaunchHostFunc
    except (OSError, AttributeError) as e:
        raise RuntimeError(f"hybrid='pool' on CUDA needs the driver's cuLaunchHostFunc (libcuda.so.1): {e}") from e
    launch.argtypes, launch.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    sem_wait = ctypes.cast(_libc.sem_wait, ctypes.c_void_p).value  # void fn(void *): its int return is ignored

    def wait(stream: torch.cuda.Stream, sem: Semaphore) -> None:
        if (rc := launch(stream.cuda_stream, sem_wait, ctypes.addressof(sem._mem))) != 0:
            raise RuntimeError(f"cuLaunchHostFunc failed (CUresult {rc})")

    return wait
