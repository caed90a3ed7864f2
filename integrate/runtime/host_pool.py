"""Hybrid's pool (`hybrid="pool"`, host_run.py): a layer's host-run experts on a thread of their own, in
the device stream's order (kTransformers' design).

On CUDA the stream copies the inputs to pinned memory and records an event the pool waits on; after the
device's experts it runs a host function (the driver's `cuLaunchHostFunc` calling libc's `sem_wait`: no
Python, no GIL on the driver's thread) that holds the stream until the pool posts that its outputs are in
pinned memory, then copies them back, while the host thread goes on to the next layer's launches. On a
CPU device the host thread is the stream: it waits on the semaphore itself. The pool computes under the
caller's grad, inference and host autocast modes (per thread, so carried by each job).

Each job has a semaphore of its own (stream_wait.py), kept until the stream has run its wait: a job never
finished leaves nothing for the next, and a wait a signal cut short (`sem_wait` returns on EINTR) is
found, its post still there, and raised (`check`).

Intra-op threads: OpenMP's count is per thread, and a new thread starts with OpenMP's default, a thread
per core, which oneDNN's bf16 matmul uses whatever torch's count; one of them then shares a core with the
busy host thread (or a predictor worker) and the team waits for it at every op (3-5x slower on our CPU,
docs/RESULTS.md, session 26; pytorch/pytorch#37259). So the pool sets its own count (`pool_threads`) on
its thread. torch keeps that count also as the one threads started later take (the calling thread keeps
its own); the pool puts back, for them, the count torch had when the pool was made (a
`torch.set_num_threads` made while it runs is undone for threads started after it ends).
`python -m benchmarks.host_pool` measures what the pool and the host thread still cost each other.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections import deque
from collections.abc import Callable, Sequence

import torch

from integrate.runtime.interrupts import deferred_interrupt
from integrate.runtime.stream_wait import Semaphore, stream_waiter


def _holds(buffer: torch.dtype, dtype: torch.dtype) -> bool:
    """A `buffer` dtype holds `dtype`'s values exactly: the same, or a wider float (autocast's bf16 in fp32)."""
    wider = dtype.is_floating_point and buffer.is_floating_point and torch.promote_types(dtype, buffer) == buffer
    return dtype == buffer or wider


def check_threads(threads) -> None:
    """A pool's `threads`: None (its default) or an int >= 1 (anything else would end its thread at start)."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"hybrid pool: threads must be an int >= 1, got {threads!r}")


def pool_threads(reserved: int = 1, predictor_worker: bool = False) -> int:
    """The pool's default intra-op threads: torch's count, at most the cores not `reserved` (the host
    thread's), nor, with `predictor_worker`, the worker process's one (predictor_worker.py), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - reserved - bool(predictor_worker)))


class _Job:
    """One layer's host work: the call, its inputs and the event that says they are in (CUDA), the output
    buffer, the caller's grad and host autocast modes, its semaphore, the event after the stream's wait on
    it (`passed`) and whether the pool is done with it."""

    __slots__ = ("fn", "inputs", "ready", "out", "dtype", "grad", "inference", "autocast", "sem", "passed", "done")

    def __init__(self, fn, inputs, ready, out, host: str):
        self.fn, self.inputs, self.ready, self.out, self.dtype = fn, inputs, ready, out, out.dtype
        self.grad, self.inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        self.autocast = torch.is_autocast_enabled(host), torch.get_autocast_dtype(host)  # thread-local state
        self.sem, self.passed, self.done = Semaphore(), None, False


class HostPool:
    """The host-run experts on a thread of their own, in the stream's order (module doc); `threads`: its
    intra-op threads (default `pool_threads()`)."""

    name = "pool"

    def __init__(self, device: torch.device, host: torch.device, threads: int | None = None):
        check_threads(threads)
        self.device, self.host = device, host
        self.threads = threads or pool_threads()
        self._torch_threads = torch.get_num_threads()  # the caller's: put back for later threads at the end
        self.cuda, self._closed = device.type == "cuda", False
        self._jobs: queue.Queue[_Job | None] = queue.Queue()  # None: stop
        self._waits: deque[_Job] = deque()  # jobs whose wait the stream may still run (their semaphores live)
        self._error: BaseException | None = None
        self._stream_wait = stream_waiter() if self.cuda else None
        self._index = (device.index if device.index is not None else torch.cuda.current_device()) if self.cuda else None
        self.thread = threading.Thread(target=self._serve, name="hybrid-host-pool", daemon=True)
        self.thread.start()

    def start(self, fn: Callable, inputs: Sequence[torch.Tensor], out_shape, out_dtype) -> _Job:
        """Queue `fn(*inputs)` (inputs on the device, read once the stream has produced them) for the pool;
        its output has `out_shape` and `out_dtype`, or a dtype that one holds exactly (checked). On CUDA the
        copy back is queued before the pool runs, so it comes back in `out_dtype`; on CPU in its own."""
        if self._closed:
            raise RuntimeError("hybrid pool: start() after close(): its thread has ended")
        self.check()
        if not self.cuda:
            job = _Job(fn, [t.to(self.host) for t in inputs], None, torch.empty(out_shape, dtype=out_dtype), self.host.type)
        else:
            with torch.cuda.device(self.device):  # the copies, the event and the wait on the model's device
                pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in inputs]
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
                out = torch.empty(out_shape, dtype=out_dtype, pin_memory=True)
                job = _Job(fn, pinned, ready, out, self.host.type)
        self._jobs.put(job)
        return job

    def finish(self, job: _Job, device: torch.device) -> torch.Tensor:
        """The job's output on `device`, in stream order: the stream (not the host) waits for the pool."""
        if not self.cuda:
            job.sem.wait()
            self.check()
            return job.out.to(job.dtype)  # the call's own dtype (autocast's bf16, held exactly in the buffer)
        with torch.cuda.device(device), deferred_interrupt():
            stream = torch.cuda.current_stream(device)
            self._waits.append(job)  # kept (its semaphore alive) before the driver may run its wait
            self._stream_wait(stream, job.sem)
            job.passed = torch.cuda.Event()
            job.passed.record(stream)
        return job.out.to(device, non_blocking=True)

    def _serve(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's OpenMP team (and the count later threads take)
        while (job := self._jobs.get()) is not None:
            try:
                if self.cuda:  # the model's device (an event's sync on another would make a context there)
                    torch.cuda.set_device(self._index)
                if job.ready is not None:
                    job.ready.synchronize()
                on, dtype = job.autocast
                with (
                    torch.inference_mode(job.inference),  # the caller's modes
                    torch.set_grad_enabled(job.grad),
                    torch.autocast(self.host.type, dtype=dtype, enabled=on),
                ):
                    out = job.fn(*job.inputs)
                    if out.shape != job.out.shape or not _holds(job.out.dtype, out.dtype):
                        raise RuntimeError(f"hybrid pool: the host experts gave {tuple(out.shape)} {out.dtype}, "
                                           f"the stream expects {tuple(job.out.shape)} {job.out.dtype}")  # fmt: skip
                    job.dtype = out.dtype
                    with torch.no_grad():  # the buffer crosses threads: no autograd history through it
                        job.out.copy_(out)
            except BaseException as e:  # raised on the host thread at its next start, finish or check
                self._error = e
            finally:
                job.sem.post()  # always, and first: the stream must never wait for ever
                job.done, job.fn, job.inputs = True, None, None
                self._jobs.task_done()
        torch.set_num_threads(self._torch_threads)  # what threads started later take, as before the pool
        self._jobs.task_done()  # the stop marker

    def check(self, wait: bool = False) -> None:
        """Raise what the pool raised (its output for that layer was never written), or a stream wait that
        a signal cut short (`sem_wait` returns on EINTR: the stream then copied that layer's output before
        the pool had written it); let go of the semaphores of waits the stream has run. `wait`: for the
        pool's jobs first (after a step's stream sync, so that a cut wait is seen in that step)."""
        if wait:
            self._jobs.join()
        while self._waits and self._waits[0].done and self._waits[0].passed and self._waits[0].passed.query():
            if self._waits.popleft().sem.value():  # the post is still there: the stream did not wait for it
                self._error = self._error or RuntimeError("a signal cut the stream's wait for a hybrid layer's "
                                                          "host experts short: that layer's output is wrong")
        if (e := self._error) is not None:
            self._error = None
            raise RuntimeError("a hybrid layer's host experts failed on the pool thread") from e

    def settle(self) -> None:
        """After a step that raised part-way, or at close: wait for the pool's jobs and the stream's waits on
        them; a failure of that abandoned step is a warning, not an error of the next."""
        self._jobs.join()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        try:
            self.check()
        except RuntimeError as e:
            warnings.warn(f"{e} (in a step that was abandoned): {e.__cause__!r}", stacklevel=2)
        finally:
            self._waits.clear()
            self._error = None

    def close(self) -> None:
        """End the pool thread once its queued jobs are done, and wait for it: a thread still in torch when
        the interpreter exits can abort the process. Once only; a later start() is refused."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self.thread.join()
