"""Where a hybrid layer's host-run experts compute (`install(hybrid=...)`, `HybridRule.run`), by name:

thread  on the calling thread, once the device's experts are queued (torch's intra-op threads). The host
        thread launches nothing meanwhile: on a host-bound step, where every launch costs host time (the
        `h100_replay` preset), their time adds to the step's (docs/RESULTS.md, session 22).
pool    on a thread of its own, in the device stream's order (kTransformers' design): the stream copies the
        inputs to pinned memory and records an event the pool waits on; then, after the device's experts,
        it runs a host function (the driver's `cuLaunchHostFunc` calling libc's `sem_wait`: no Python, no
        GIL on the driver's thread) that holds the stream until the pool posts that its outputs are in
        pinned memory, and copies them back. The host thread goes on to the next layer's launches at once.
        On a CPU device the host thread is the stream: it waits on the semaphore itself.

Both compute the same call on the same inputs, so their outputs are equal to the bit. A job started and
never finished (an exception, a Ctrl-C between the two) or a `sem_wait` cut short by a signal leaves the
semaphore one post ahead: `settle()` (the cache's `abort_step`) waits for the pool and the device, and
starts the count again from zero.
"""

from __future__ import annotations

import ctypes
import errno
import queue
import threading
from collections.abc import Callable, Sequence

import torch

_libc = ctypes.CDLL(None, use_errno=True)


class Semaphore:
    """A POSIX unnamed semaphore in memory of our own, so that a CUDA host function can wait on it."""

    def __init__(self):
        self._mem = (ctypes.c_long * 8)()  # sem_t is 32 bytes on Linux (x86-64, aarch64), 8-byte aligned
        self.reset()

    def reset(self) -> None:
        if _libc.sem_init(self._mem, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init: hybrid='pool' needs POSIX unnamed semaphores (Linux)")

    @property
    def address(self) -> int:
        return ctypes.addressof(self._mem)

    def post(self) -> None:
        _libc.sem_post(self._mem)

    def wait(self) -> None:
        while _libc.sem_wait(self._mem) != 0:  # ctypes drops the GIL while it blocks
            if (err := ctypes.get_errno()) != errno.EINTR:
                raise OSError(err, "sem_wait")


def _stream_waiter() -> Callable[[torch.cuda.Stream, Semaphore], None]:
    """`wait(stream, sem)`: the stream runs `sem_wait(sem)` on the driver's host-function thread when it
    gets there, and nothing after it until the semaphore is posted."""
    try:
        launch = ctypes.CDLL("libcuda.so.1").cuLaunchHostFunc
    except (OSError, AttributeError) as e:
        raise RuntimeError(f"hybrid='pool' on CUDA needs the driver's cuLaunchHostFunc (libcuda.so.1): {e}") from e
    launch.argtypes, launch.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    sem_wait = ctypes.cast(_libc.sem_wait, ctypes.c_void_p).value  # void fn(void *): its int return is ignored

    def wait(stream: torch.cuda.Stream, sem: Semaphore) -> None:
        if (rc := launch(stream.cuda_stream, sem_wait, sem.address)) != 0:
            raise RuntimeError(f"cuLaunchHostFunc failed (CUresult {rc})")

    return wait


class HostThread:
    """The host-run experts on the calling thread, after the device's part is queued."""

    name = "thread"

    def __init__(self, device: torch.device, host: torch.device):
        self.device, self.host = device, host

    def start(self, fn: Callable, inputs: Sequence[torch.Tensor], out_shape, out_dtype):
        # SYNC POINT (device -> host), before the device's part is queued, so that the two run side by side
        return fn, [t.to(self.host) for t in inputs]

    def finish(self, job, device: torch.device) -> torch.Tensor:
        fn, inputs = job
        return fn(*inputs).to(device)

    def check(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Job:
    __slots__ = ("fn", "inputs", "ready", "out", "shape", "dtype")

    def __init__(self, fn, inputs, ready, out, shape, dtype):
        self.fn, self.inputs, self.ready, self.out, self.shape, self.dtype = fn, inputs, ready, out, shape, dtype


class HostPool(HostThread):
    """The host-run experts on a thread of their own, in the stream's order (module doc)."""

    name = "pool"

    def __init__(self, device: torch.device, host: torch.device):
        super().__init__(device, host)
        self.cuda = device.type == "cuda"
        self._done = Semaphore()  # one post per job, once its output is in place
        self._jobs: queue.Queue[_Job | None] = queue.Queue()  # None: stop
        self._error: BaseException | None = None
        self._stream_wait = _stream_waiter() if self.cuda else None
        threading.Thread(target=self._serve, name="hybrid-host-pool", daemon=True).start()

    def start(self, fn: Callable, inputs: Sequence[torch.Tensor], out_shape, out_dtype) -> _Job:
        """Queue `fn(*inputs)` (inputs on the device, read once the stream has produced them) for the pool;
        its output has `out_shape` and `out_dtype`."""
        self.check()
        ready = out = None
        if self.cuda:  # pinned copies on the stream, an event when they are in
            inputs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in inputs]
            ready = torch.cuda.Event()
            ready.record()
            out = torch.empty(out_shape, dtype=out_dtype, pin_memory=True)
        else:
            inputs = [t.to(self.host) for t in inputs]
        job = _Job(fn, inputs, ready, out, tuple(out_shape), out_dtype)
        self._jobs.put(job)
        return job

    def finish(self, job: _Job, device: torch.device) -> torch.Tensor:
        """The job's output on `device`, in stream order: the stream (not the host) waits for the pool."""
        if self.cuda:
            self._stream_wait(torch.cuda.current_stream(device), self._done)
            return job.out.to(device, non_blocking=True)
        self._done.wait()
        self.check()
        return job.out

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                out = job.fn(*job.inputs)
                if (tuple(out.shape), out.dtype) != (job.shape, job.dtype):  # the pinned buffer was made for these
                    raise RuntimeError(f"hybrid pool: the host experts gave {tuple(out.shape)} {out.dtype}, "
                                       f"the stream expects {job.shape} {job.dtype}")  # fmt: skip
                if job.out is None:
                    job.out = out
                else:
                    job.out.copy_(out)
            except BaseException as e:  # raised on the host thread at its next start, finish or check
                self._error = e
            finally:
                job.fn = job.inputs = None
                self._done.post()  # always: the stream must never wait for ever
                self._jobs.task_done()

    def check(self) -> None:
        """Raise what the pool raised (its output for that layer was never written)."""
        if (e := self._error) is not None:
            self._error = None
            raise RuntimeError("a hybrid layer's host experts failed on the pool thread") from e

    def settle(self) -> None:
        """After a step that raised part-way: wait for the pool's jobs and the device's queued host functions,
        then count posts from zero again (a job started and never finished left one over)."""
        self._jobs.join()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._done.reset()
        self._error = None

    def close(self) -> None:
        """End the pool thread once its queued jobs are done."""
        self._jobs.put(None)


HOST_RUNS = {c.name: c for c in (HostThread, HostPool)}
