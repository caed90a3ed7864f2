"""Where hybrid's host experts compute (integrate/runtime/host_run.py): the pool thread's protocol on CPU,
and on CUDA the stream, not the host, waiting for it."""

import ctypes
import os
import threading
import time

import pytest
import torch

from integrate.runtime.host_pool import HostPool
from integrate.runtime.host_run import HOST_RUNS
from integrate.runtime.stream_wait import Semaphore

CPU = torch.device("cpu")


def test_semaphore_counts_posts():
    sem = Semaphore()
    sem.post()
    sem.post()
    sem.wait()
    sem.wait()  # two posts, two waits: neither blocks
    got = []
    t = threading.Thread(target=lambda: (sem.wait(), got.append(1)))
    t.start()
    t.join(0.05)
    assert not got  # nothing posted: it waits
    sem.post()
    t.join(2)
    assert got == [1]


def _openmp() -> ctypes.CDLL:
    """The OpenMP runtime torch loaded (its own thread counts), or skip."""
    from benchmarks.host_pool import torch_openmp

    if (omp := torch_openmp()) is None:
        pytest.skip("torch's own OpenMP runtime is not found among the loaded libraries (not Linux, or not OpenMP)")
    return omp


def test_pool_sets_its_own_openmp_threads():
    """A new thread starts with OpenMP's default team (a thread per core, or OMP_NUM_THREADS), which
    oneDNN's bf16 matmul uses whatever torch's count (one member then waits on the busy host thread at
    every op): the pool sets its own, the host thread's is left as it was; by default the pool leaves a
    core to the host thread."""
    omp, cores, n = _openmp(), len(os.sched_getaffinity(0)), torch.get_num_threads()
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(omp.omp_get_max_threads()))
    t.start()
    t.join()
    try:
        pool = HostPool(CPU, CPU, threads=fresh[0] + 1)  # not what a new thread starts with
        try:
            job = pool.start(lambda x: x + omp.omp_get_max_threads(), [torch.zeros(1)], (1,), torch.float32)
            assert pool.finish(job, CPU).item() == fresh[0] + 1
        finally:
            pool.close()
        assert torch.get_num_threads() == n and omp.omp_get_max_threads() == n
        later = []  # a thread started after the pool ended takes torch's count as it was before the pool
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [n]
        torch.set_num_threads(cores)
        default = HostPool(CPU, CPU)
        default.close()
        assert default.threads == max(1, cores - 1)
    finally:
        torch.set_num_threads(n)  # the pools set torch's process-wide count too
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            HostPool(CPU, CPU, threads=bad)


def test_the_rule_times_the_expert_where_it_runs():
    """The hybrid rule's one-expert time is taken on the pool's thread (its own intra-op threads) for
    hybrid="pool", on the calling thread otherwise."""
    from integrate.runtime.hybrid import host_ms

    for run, where in (("pool", "hybrid-host-pool"), ("thread", threading.current_thread().name)):
        names = []
        ms = host_ms(lambda names=names: names.append(threading.current_thread().name), run, repeats=3)
        assert names == [where] * 4 and ms >= 0  # a warm-up, then the timed calls
    seen = []
    host_ms(lambda: seen.append(torch.get_num_threads()), "pool", 3, threads=5)
    assert seen == [5] * 4  # with the pool's intra-op threads


@pytest.mark.filterwarnings("ignore:the served model's tokenizer records no token space")
def test_the_pool_leaves_a_core_to_the_host_thread_and_to_a_predictor_worker(tmp_path, monkeypatch):
    """`pool_threads`: torch's count, at most the cores not reserved, at least 1. install(hybrid="pool")
    reserves the host thread's core, and one more with the predictor in a worker process (one thread),
    which would otherwise share a core with a member of the pool's team (8 cores, as the pool sees them)."""
    from synthetic import tiny_predictor
    from tiny_models import tiny_moe_model

    from integrate.runtime import install
    from integrate.runtime.host_pool import pool_threads
    from predictor.export import export_predictor

    cores, n = 8, torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    model = tiny_moe_model("olmoe")
    L = len([m for m, _ in model.named_modules() if m.endswith("mlp.experts")])
    path = export_predictor(tiny_predictor(vocab_size=model.config.vocab_size, num_layers=L), tmp_path / "p.safetensors")
    try:
        torch.set_num_threads(1)
        assert pool_threads(2) == 1
        torch.set_num_threads(cores)
        assert [pool_threads(1), pool_threads(2)] == [7, 6]
        for worker, reserved in ((False, 1), (True, 2)):
            extra = {"predictor": path, "predictor_worker": True} if worker else {}
            rt = install(model, device="cpu", hybrid="pool", **extra)
            try:
                assert rt.cache.hybrid.threads == rt.cache.host_run.threads == cores - reserved
            finally:
                rt.uninstall()
    finally:
        torch.set_num_threads(n)


def test_pool_runs_jobs_on_its_thread_in_order():
    pool = HostPool(CPU, CPU)
    names = []

    def job(x, k):
        names.append(threading.current_thread().name)
        return x * k

    x = torch.arange(6.0).view(2, 3)
    jobs = [pool.start(lambda x, k=k: job(x, k), [x], (2, 3), x.dtype) for k in (1, 2, 3)]
    outs = [pool.finish(j, CPU) for j in jobs]
    assert [torch.equal(o, x * k) for o, k in zip(outs, (1, 2, 3))] == [True] * 3
    assert names == ["hybrid-host-pool"] * 3
    pool.close()


def test_pool_failure_is_raised_on_the_host_and_the_next_job_runs():
    pool = HostPool(CPU, CPU)
    x = torch.ones(2)
    bad = pool.start(lambda x: x.view(3), [x], (2,), x.dtype)
    with pytest.raises(RuntimeError, match="failed on the pool thread") as err:
        pool.finish(bad, CPU)
    assert "shape '[3]' is invalid" in str(err.value.__cause__)
    wrong = pool.start(lambda x: x.double(), [x], (2,), x.dtype)  # not what the pinned buffer is made for
    with pytest.raises(RuntimeError, match="failed on the pool thread") as err:
        pool.finish(wrong, CPU)
    assert "gave (2,) torch.float64, the stream expects (2,) torch.float32" in str(err.value.__cause__)
    assert torch.equal(pool.finish(pool.start(lambda x: x + 1, [x], (2,), x.dtype), CPU), x + 1)
    pool.close()


def test_a_job_never_finished_leaves_nothing_for_the_next():
    """A step that raised between start and finish: its job runs and posts its own semaphore; the next
    finish still waits for its own job (no settle needed)."""
    pool = HostPool(CPU, CPU)
    x = torch.ones(2)
    pool.start(lambda x: x, [x], (2,), x.dtype)  # started, never finished (a Ctrl-C between)
    gate, got = threading.Event(), []
    job = pool.start(lambda x: (gate.wait(5), x * 7)[1], [x], (2,), x.dtype)
    t = threading.Thread(target=lambda: got.append(pool.finish(job, CPU)))
    t.start()
    t.join(0.1)
    assert not got  # it waits for this job, not for the old one's post
    gate.set()
    t.join(5)
    assert torch.equal(got[0], x * 7)
    pool.settle()
    pool.close()


def test_pool_keeps_the_callers_inference_and_grad_modes():
    """The output buffer is made on the caller's thread (an inference tensor under inference_mode), and the
    pool writes it under the caller's modes."""
    pool = HostPool(CPU, CPU)
    w = torch.ones(3, requires_grad=True)
    with torch.inference_mode():
        out = pool.finish(pool.start(lambda x: x * w, [torch.ones(3)], (3,), torch.float32), CPU)
    assert out.is_inference() and torch.equal(out, torch.ones(3))
    with torch.no_grad():
        out = pool.finish(pool.start(lambda x: x * w, [torch.ones(3)], (3,), torch.float32), CPU)
    assert not out.requires_grad
    out = pool.finish(pool.start(lambda x: x * w, [torch.ones(3)], (3,), torch.float32), CPU)
    assert not out.requires_grad  # grad on: the buffer crosses threads, no history goes through it
    pool.close()


def test_pool_keeps_the_callers_host_autocast():
    """Autocast is thread-local: the pool runs its job under the caller's host autocast, as the thread path
    does, and hands back the call's own dtype; an output its buffer cannot hold exactly is refused."""
    pool = HostPool(CPU, CPU)
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = HOST_RUNS["thread"](CPU, CPU).finish((torch.mm, [a, b]), CPU)
        out = pool.finish(pool.start(torch.mm, [a, b], (4, 3), torch.float32), CPU)
    assert ref.dtype == out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out = pool.finish(pool.start(torch.mm, [a, b], (4, 3), torch.float32), CPU)
    assert out.dtype == torch.float32 and torch.equal(out, torch.mm(a, b))  # autocast off again
    with pytest.raises(RuntimeError, match="failed on the pool thread") as err:
        pool.finish(pool.start(torch.mm, [a, b], (4, 3), torch.bfloat16), CPU)
    assert "gave (4, 3) torch.float32, the stream expects (4, 3) torch.bfloat16" in str(err.value.__cause__)
    i = torch.tensor([2**24 + 1])  # an integer a float32 buffer would round
    with pytest.raises(RuntimeError, match="failed on the pool thread") as err:
        pool.finish(pool.start(lambda t: t, [i], (1,), torch.float32), CPU)
    assert "torch.int64, the stream expects (1,) torch.float32" in str(err.value.__cause__)
    pool.close()
    pool.close()  # once only
    with pytest.raises(RuntimeError, match=r"start\(\) after close\(\)"):
        pool.start(torch.mm, [a, b], (4, 3), torch.float32)


def test_a_stream_wait_cut_short_is_raised():
    """The stream ran past a job's wait without its post (sem_wait returned on EINTR): once the pool is done
    and the stream is past it, the post is still there, and check says so."""
    pool = HostPool(CPU, CPU)
    x = torch.ones(2)
    job = pool.start(lambda x: x, [x], (2,), x.dtype)
    job.passed = type("Passed", (), {"query": lambda self: True})()  # what finish records on CUDA
    pool._waits.append(job)
    with pytest.raises(RuntimeError, match="failed on the pool thread") as err:
        pool.check(wait=True)  # (after the step's stream sync): waits for the pool, so it is seen in this step
    assert "a signal cut the stream's wait" in str(err.value.__cause__)
    assert not pool._waits
    pool.check()  # raised once
    pool.close()


def test_cache_close_lets_go_of_everything_when_the_pool_failed():
    """A failure nobody collected (its step was abandoned) is a warning at close, which still lets go of
    the slots, the store and the pool's thread; so is one found when the next step settles the last."""
    from integrate.runtime.cache import ExpertCache
    from integrate.runtime.hybrid import HybridRule
    from integrate.runtime.store import ExpertLayout, ExpertStore

    store = ExpertStore(ExpertLayout({"w": torch.empty(16)}), 1, 4, pin=False)
    cache = ExpertCache(store, 2, "cpu", hybrid=HybridRule(run="pool"))
    run = cache.host_run
    x = torch.ones(2)
    run.start(lambda x: x.view(3), [x], (2,), x.dtype)  # fails on the pool; never finished (its step raised)
    with pytest.warns(UserWarning, match="failed on the pool thread .in a step that was abandoned.*shape"):
        cache.abort_step()  # the next step settles it: a warning, not that step's error
    assert torch.equal(run.finish(run.start(lambda x: x + 1, [x], (2,), x.dtype), CPU), x + 1)
    run.start(lambda x: x.view(3), [x], (2,), x.dtype)
    with pytest.warns(UserWarning, match="failed on the pool thread"):
        cache.close()
    assert cache.store.arena is None and cache.pool.buffer is None and cache._host_run is None
    run.thread.join(5)
    assert not run.thread.is_alive()
    run.settle()  # after close: returns (the stop marker is done too)


def test_a_new_rule_with_other_threads_gets_a_new_pool():
    """cache.host_run follows the rule: the same pool while its run and threads hold (threads None: the
    pool's default), a new one, the old one closed, when the rule asks for other threads."""
    from integrate.runtime.cache import ExpertCache
    from integrate.runtime.host_pool import pool_threads
    from integrate.runtime.hybrid import HybridRule
    from integrate.runtime.store import ExpertLayout, ExpertStore

    store = ExpertStore(ExpertLayout({"w": torch.empty(16)}), 1, 4, pin=False)
    cache = ExpertCache(store, 2, "cpu", hybrid=HybridRule(run="pool", threads=1))
    first = cache.host_run
    assert first.threads == 1 and cache.host_run is first
    cache.hybrid = HybridRule(run="pool")  # no count asked: the default one, which the rule was timed on
    assert cache.host_run.threads == pool_threads() and (cache.host_run is first) == (pool_threads() == 1)
    cache.hybrid = HybridRule(run="pool", threads=2)
    second = cache.host_run
    assert second is not first and second.threads == 2
    first.thread.join(5)
    assert not first.thread.is_alive()
    assert cache.host_run is second
    cache.hybrid = HybridRule(run="thread", threads=2)  # the calling thread: its count is not the rule's to set
    assert cache.host_run.name == "thread" and cache.host_run is cache.host_run
    second.thread.join(5)
    assert not second.thread.is_alive()
    cache.close()


def test_close_ends_the_pool_thread_and_counts_unrouted_prefetches_even_when_settling_raises():
    """With warnings as errors, the failure nobody collected makes settling raise at close: the error
    reaches the caller, and the pool's thread ends and the slots and store are let go all the same; the
    prefetches issued and never routed count as wasted (issued = used + wasted)."""
    import warnings

    from integrate.runtime.cache import ExpertCache
    from integrate.runtime.hybrid import HybridRule
    from integrate.runtime.store import ExpertLayout, ExpertStore

    store = ExpertStore(ExpertLayout({"w": torch.empty(16)}), 1, 4, pin=False)
    cache = ExpertCache(store, 2, "cpu", hybrid=HybridRule(run="pool"))
    cache.prefetch([(0, 1), (0, 2)])
    run, x = cache.host_run, torch.ones(2)
    run.start(lambda x: x.view(3), [x], (2,), x.dtype)  # fails on the pool; never finished
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="failed on the pool thread"):
            cache.close()
    run.thread.join(5)
    assert not run.thread.is_alive() and cache._host_run is None
    assert cache.store.arena is None and cache.pool.buffer is None
    c = cache.counters
    assert (c.prefetches_issued, c.prefetches_used, c.prefetches_wasted) == (2, 0, 2)


def test_hybrid_run_names_are_checked():
    from integrate.runtime.hybrid import HybridRule

    assert sorted(HOST_RUNS) == ["pool", "thread"]
    with pytest.raises(ValueError, match="hybrid run 'gpu': choose from"):
        HybridRule(run="gpu")
    for bad in (0, 2.5, True):  # a pool thread given one would die before its first job, the stream waiting
        with pytest.raises(ValueError, match="hybrid pool: threads must be an int >= 1"):
            HybridRule(run="pool", threads=bad)


def test_install_refuses_an_unknown_hybrid_run():
    from tiny_models import tiny_moe_model

    from integrate.runtime import install

    model = tiny_moe_model("mixtral")
    with pytest.raises(ValueError, match=r"hybrid='threads': True, or where the host's experts run"):
        install(model, device="cpu", hybrid="threads")
    # a bad setting is refused before the host copy of every expert (minutes and the model's size, pinned)
    from integrate.runtime import installer

    def no_copy(*args, **kwargs):
        raise AssertionError("the host copy started before the settings were checked")

    cases = [(dict(hybrid="threads"), "hybrid='threads'"), (dict(policy="lur"), "eviction policy 'lur'"),
             (dict(capacity=2.5), "capacity fraction 2.5"), (dict(device="gpu"), "device=gpu: not a device")]
    if not torch.cuda.is_available():  # (it was pin_memory's error, naming no device)
        cases.append((dict(device="cuda"), "device=cuda requested but torch sees no CUDA device"))
    for kwargs, message in cases:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(installer.ExpertStore, "from_experts", no_copy)
            with pytest.raises(ValueError, match=message):
                install(model, **{"device": "cpu", **kwargs})
    assert not any(type(m).__name__ == "OffloadedExperts" for m in model.modules())  # nothing was swapped
    model.set_experts_implementation("eager")
    with pytest.warns(UserWarning, match="hybrid='pool' serves grouped_mm and batched_mm layers; these run 'eager'"):
        install(model, device="cpu", hybrid="pool").uninstall()


@pytest.mark.parametrize("arch", ["deepseek_v2", "mixtral", "qwen3_moe"])
def test_pool_equals_thread_and_the_unpatched_model_in_bf16(arch):
    """bf16 weights, and for DeepSeek-V2 and Mixtral fp32 router weights, so the host's terms are fp32: the
    pool's buffer takes the terms' dtype, and its logits equal the thread's and the unpatched model's."""
    from tiny_models import tiny_moe_model

    from integrate.runtime import install

    model = tiny_moe_model(arch).to(torch.bfloat16)
    ids = torch.arange(1, 9).view(1, -1)
    with torch.inference_mode():
        ref = model(ids).logits
    for run in ("thread", "pool"):
        rt = install(model, device="cpu", capacity=0.25, hybrid=run)
        with torch.inference_mode():
            out = model(ids).logits
        assert rt.counters.host_experts > 0
        assert f"misses run on the host {rt.counters.host_experts}" in rt.counters.summary()
        rt.uninstall()
        assert torch.equal(out, ref), run


@pytest.mark.gpu
def test_cuda_pool_holds_the_stream_not_the_host():
    """On CUDA the host thread returns from finish at once; the stream waits in its host function until
    the pool's output is in, then copies it back: the result after a sync is the job's."""
    dev = torch.device("cuda")
    pool = HostPool(dev, CPU)
    x = torch.randn(4, 8, device=dev)
    y = x * 2  # queued before the job: its input, read once the stream has produced it

    def slow(h):
        time.sleep(0.2)
        return h + 1

    t0 = time.perf_counter()
    job = pool.start(slow, [y], (4, 8), y.dtype)
    out = pool.finish(job, dev) * 3  # queued behind the stream's wait
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert host_s < 0.1 < time.perf_counter() - t0
    torch.testing.assert_close(out, (x * 2 + 1) * 3, rtol=0, atol=0)
    pool.settle()
    pool.close()


@pytest.mark.gpu
def test_cuda_runtime_pool_equals_thread_to_the_bit():
    """The runtime's grouped path on CUDA with every miss on the host (a rule with no link): the pool's
    logits equal the calling thread's, bit for bit, over a prefill and a few one-token steps."""
    from tiny_models import tiny_moe_model

    from integrate.runtime import install
    from integrate.runtime.hybrid import HybridRule

    logits = {}
    for run in ("thread", "pool"):
        model = tiny_moe_model("qwen3_moe").to(torch.bfloat16)  # (grouped_mm's dtype on the GPU)
        rt = install(model, device="cuda", capacity=0.25, hybrid=run)
        rt.cache.hybrid = HybridRule(run=run)  # no link: every miss runs on the host, whatever the timing
        ids = torch.arange(1, 9, device="cuda").view(1, -1)
        with torch.inference_mode():  # (the pool's output buffer is then an inference tensor)
            outs = [model(ids).logits] + [model(ids[:, i : i + 1]).logits for i in range(3)]
        logits[run] = [o.cpu() for o in outs]
        assert rt.counters.host_experts > 0
        rt.uninstall()
    assert all(torch.equal(a, b) for a, b in zip(logits["thread"], logits["pool"]))


def test_host_pool_benchmark_times_both_runs(capsys):
    from benchmarks.host_pool import contention, main, measure

    times = measure(jobs=20, runs=2)
    assert [len(v) for v in times.values()] == [2, 2] and all(t > 0 for v in times.values() for t in v)
    c = contention(experts=1, runs=1, ops=2000)
    assert all(c[k] > 0 for k in ("alone_us", "thread_us", "process_us", "layer_alone_ms", "layer_beside_ms",
                                  "plain_beside_ms", "default_beside_ms", "threads"))
    main(["--jobs", "20", "--runs", "1", "--experts", "1", "--ops", "2000"])
    out = capsys.readouterr().out
    assert "the pool's round trip:" in out and "beside a process doing the same" in out and "a plain thread computing layers" in out
    assert "intra-op threads" in out and "on OpenMP's default team" in out
    from benchmarks.host_pool import openmp_counts, torch_openmp

    if torch_openmp() is not None:  # a new thread's OpenMP count, and the pool's own
        assert "OpenMP threads:" in out and openmp_counts(1)[1] == 1
