"""Offloading runtime: slot pool and cache on fake experts, then exactness on every tiny architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import tiny_predictor
from tiny_models import ARCHITECTURES, tiny_moe_model

from integrate.runtime import install, resolve_capacity
from integrate.runtime.cache import ExpertCache
from integrate.runtime.slots import SlotPool
from integrate.runtime.store import ExpertStore

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 7, 11, 64]])
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_store(L=3, E=5, pin=False) -> ExpertStore:
    """Expert (l, e) holds the constant 100 * l + e in a float32 matrix and a bf16 bias."""
    get = lambda layer, e: {
        "w": torch.full((4, 3), 100.0 * layer + e),
        "b": torch.full((3,), float(e), dtype=torch.bfloat16),
    }
    return ExpertStore.from_experts(get, L, E, pin=pin)


# ---------------------------------------------------------------- store, slots, cache on fake experts


def test_store_packs_each_expert_contiguously():
    store = fake_store()
    t = store.tensors(2, 4)
    assert t["w"].shape == (4, 3) and t["w"].dtype == torch.float32 and float(t["w"][0, 0]) == 204.0
    assert t["b"].dtype == torch.bfloat16 and float(t["b"][0]) == 4.0
    buf = store.buffer(2, 4)
    assert buf.is_contiguous() and buf.numel() == store.expert_bytes
    assert t["w"].data_ptr() >= buf.data_ptr() and t["b"].data_ptr() < buf.data_ptr() + buf.numel()
    assert store.expert_bytes % 256 == 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "predictor"])
def test_slot_pool_evicts_by_policy(policy):
    pool = SlotPool(2, 16, "cpu", policy)
    pool.allocate((0, 0), set())
    pool.allocate((0, 1), set())
    for _ in range(3):
        pool.used((0, 0))
    pool.used((0, 1))  # (0, 0): older but more frequent
    pool.predict([(0, 1)], replace=True)
    slot, evicted = pool.allocate((0, 2), set())
    expected = {"lru": (0, 0), "lfu": (0, 1), "predictor": (0, 0)}[policy]
    assert evicted == expected and pool.lookup(expected) is None and pool.lookup((0, 2)) == slot
    assert pool.allocate((0, 3), {(0, 2), (0, 1)}, {(0, 0)}) is None  # everything protected


def test_prediction_aware_evicts_unpredicted_first():
    pool = SlotPool(2, 16, "cpu", "predictor")
    pool.allocate((0, 0), set())
    pool.allocate((0, 1), set())
    pool.predict([(0, 0)])  # (0, 0) is the LRU but predicted
    assert pool.allocate((1, 0), set())[1] == (0, 1)


@pytest.mark.parametrize("policy", ["lru", "lfu", "predictor"])
def test_a_prefetch_never_evicts_a_resident_expert_of_its_own_list(policy):
    """With lru and lfu the pool kept no predictions, so a prediction list whose first expert was resident
    and least recent evicted it for the second (the simulator shields it under every policy)."""
    from integrate.runtime.cache import ExpertCache

    cache = ExpertCache(fake_store(L=2, E=8), 2, "cpu", policy)
    cache.fetch(1, 0)
    cache.end_layer(1)
    cache.fetch(0, 5)
    cache.end_layer(0)  # (1, 0) is the least recent (and, for lfu, as frequent as (0, 5))
    keys = [(1, 0), (1, 1)]  # a driver's picks for layer 1: (1, 0) is resident already
    cache.pool.predict(keys, replace=True)
    cache.prefetch(keys)
    assert sorted(cache.pool.slot_of) == [(1, 0), (1, 1)]


class _Pending:
    """A copy event that has not landed until told (a CUDA event's query(), on the CPU)."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done


class _SlowCopier:
    """The runtime's copier as on CUDA (copies land later), so the in-flight cap binds on the CPU."""

    cuda = True

    def __init__(self):
        self.events = []

    def copy(self, dst, src, demand, after=()):
        torch._foreach_copy_(dst, src)
        self.events.append(_Pending())
        return self.events[-1]

    def synchronize(self):
        pass


def test_a_layers_queued_prefetches_are_dropped_once_its_routing_is_known():
    """Queued picks of a layer not among its routed experts can no longer help it; a pump between its
    readback and its end issued them (taking link time and in-flight places from the next layers)."""
    from integrate.runtime.cache import ExpertCache

    cache = ExpertCache(fake_store(L=2, E=8), 6, "cpu", "lru", max_inflight=2)
    cache.cuda, cache.copier = True, _SlowCopier()
    cache._release = lambda: setattr(cache, "_in_use", [])  # no compute-stream events on the CPU
    cache._wait = lambda slot: None
    cache.prefetch([(0, 0), (0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (1, 6), (1, 7)])  # a token_ahead driver's picks
    assert cache.counters.prefetches_issued == 2
    for ev in cache.copier.events:
        ev.done = True  # (0, 0) and (0, 1) land
    cache.guard_routing(0, [0, 1])  # layer 0 routes the two it has: (0, 2) and (0, 3) are of no use now
    cache.fetch_group(0, [0, 1])
    assert list(cache._queue) == [(1, 6), (1, 7)] and set(cache._unused) == {(1, 4), (1, 5)}
    cache.end_layer(0)
    assert cache.counters.prefetches_wasted == 0 and cache.counters.prefetches_used == 2


def test_per_layer_slots_stay_in_their_layer():
    pool = SlotPool(4, 16, "cpu", "lru", num_layers=2)
    for e in range(3):
        pool.allocate((0, e), set())
    assert pool.lookup((0, 0)) is None  # layer 0 has only 2 slots
    pool.allocate((1, 0), set())
    assert {pool.lookup((0, 1)), pool.lookup((0, 2))} == {0, 1} and pool.lookup((1, 0)) in (2, 3)
    with pytest.raises(ValueError):
        SlotPool(3, 16, "cpu", "lru", num_layers=2)


def test_cache_one_slot_serves_every_expert_and_counts():
    store = fake_store()
    cache = ExpertCache(store, 1, "cpu")
    for layer, e in [(0, 1), (0, 3), (1, 0), (1, 0)]:
        assert float(cache.fetch(layer, e)["w"][0, 0]) == 100 * layer + e
        if (layer, e) == (0, 3):
            cache.end_layer(0)
    c = cache.counters
    assert (c.hits, c.misses, c.demand_loads, c.bytes_moved) == (1, 3, 3, 3 * store.expert_bytes)


def test_cache_prefetch_used_wasted_and_queue_limits():
    store = fake_store()
    cache = ExpertCache(store, 2, "cpu", policy="predictor")
    cache.pool.predict([(1, 0), (1, 1), (1, 2)], replace=True)
    cache.prefetch([(1, 0), (1, 1), (1, 2)])  # only two fit; the third waits in the queue
    c = cache.counters
    assert c.prefetches_issued == 2
    cache.fetch(1, 0)
    cache.fetch(1, 2)  # (1, 0) is done: its slot frees, the queued prefetch... was demanded first
    cache.end_layer(1)  # (1, 1) was prefetched and never routed
    assert (c.hits, c.misses, c.prefetches_used, c.prefetches_wasted) == (1, 1, 1, 1)
    assert c.prefetches_issued == c.prefetches_used + c.prefetches_wasted


def _count_copy_calls(cache) -> list[int]:
    """Wrap the cache's copier: the batch size of every copy call, in order."""
    calls, copy = [], cache.copier.copy
    cache.copier.copy = lambda dst, src, *a, **k: calls.append(len(dst)) or copy(dst, src, *a, **k)
    return calls


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_layers_copies_take_one_call_each_way(device):
    """The grouped path's demand misses of a layer go in one copy call, and so do the prefetches
    issued together; every expert lands where the slot table says (on CUDA: after the events)."""
    store = fake_store(pin=device == "cuda")
    cache = ExpertCache(store, 4, device, policy="predictor", max_inflight=3)
    calls = _count_copy_calls(cache)
    slots = cache.fetch_group(0, [1, 3, 4])
    assert calls == [3] and cache.counters.demand_loads == 3
    w = cache.pool_views()["w"]
    assert [float(w[s, 0, 0]) for s in slots] == [1.0, 3.0, 4.0]
    cache.end_layer(0)
    cache.pool.predict([(1, 0), (1, 2), (1, 4)], replace=True)
    cache.prefetch([(1, 0), (1, 2), (1, 4)])  # max_inflight 3: all three in one call
    assert calls == [3, 3] and cache.counters.prefetches_issued == 3
    slots = cache.fetch_group(1, [0, 2, 4])
    assert calls == [3, 3] and [float(w[s, 0, 0]) for s in slots] == [100.0, 102.0, 104.0]
    cache.end_step()
    c = cache.counters
    assert (c.hits + c.misses, c.bytes_moved) == (6, 6 * store.expert_bytes)


def test_prefetches_issued_at_a_layers_routing_leave_its_routed_experts():
    """A driver reads a layer's routing back and prefetches for the layers after it before the layer
    computes; from that readback (`guard_routing`, which every driver's readback calls) no copy evicts
    the layer's routed experts, as in the simulator, where a row's keys are never evicted."""
    cache = ExpertCache(fake_store(L=2, E=8), 4, "cpu", "lru")

    def run_layer(layer, experts, prefetch=()):
        cache.guard_routing(layer, experts)  # the driver's readback (Prefetcher._record)
        cache.prefetch(list(prefetch))  # its picks for the next layer, issued now
        with cache.layer_routing(layer, experts):
            for e in experts:
                cache.fetch(layer, e)
        cache.end_layer(layer)

    run_layer(0, [0, 1])
    run_layer(1, [2, 3])
    cache.end_step()
    hits = cache.counters.hits
    run_layer(0, [0, 1], prefetch=[(1, 4), (1, 5)])  # the LRU victims would be layer 0's own experts
    assert cache.counters.hits - hits == 2
    assert {(0, 0), (0, 1)} <= set(cache.pool.slot_of) and cache.counters.prefetches_issued == 2


def test_drivers_guard_the_routing_they_read_back(monkeypatch):
    """Co-occurrence prefetch through a real model: the guard set at the driver's readback keeps hits
    (tokens are the same either way)."""
    def run():
        model = tiny_moe_model("olmoe", num_hidden_layers=4)
        rt = install(model, device="cpu", capacity=10, prefetch="cooc")
        with torch.no_grad():
            out = model.generate(torch.tensor([[5, 17, 99, 3, 42, 7, 11, 64]]), max_new_tokens=30, do_sample=False)
        hits = rt.counters.hits
        rt.uninstall()
        return out, hits

    out, guarded = run()
    monkeypatch.setattr(ExpertCache, "guard_routing", lambda *args: None)
    same, unguarded = run()
    assert torch.equal(out, same) and guarded > unguarded


@pytest.mark.parametrize(
    "capacity, expected",
    [(0.25, 6), (1.0, 24), (3, 3), ("2KiB", 2), (0.01, 1), ("0.25", 6), ("3", 3), (np.int64(3), 3), (np.float32(0.5), 12)],
)
def test_resolve_capacity(capacity, expected):
    assert resolve_capacity(capacity, 3, 8, 1024, per_layer=False) == expected


def test_resolve_capacity_per_layer_and_errors():
    assert resolve_capacity(0.5, 3, 8, 1024, per_layer=True) == 12
    with pytest.raises(ValueError):
        resolve_capacity(2, 3, 8, 1024, per_layer=True)
    for bad in ("lots", "1.2.3GiB", ".GiB", True, None):
        with pytest.raises(ValueError, match=f"capacity {bad!r}: expected a fraction"):
            resolve_capacity(bad, 3, 8, 1024, per_layer=False)
    assert resolve_capacity(".5KiB", 3, 8, 512, per_layer=False) == resolve_capacity("1.KiB", 3, 8, 1024, False) == 1


# ---------------------------------------------------------------- exactness on tiny HF models


def _generate(model, device="cpu"):
    with torch.no_grad():
        return model.generate(PROMPT.to(device), max_new_tokens=NEW_TOKENS, do_sample=False).cpu()



def _reference(model, device="cpu"):
    """The unpatched model's greedy tokens and its prompt logits (on the host), to compare against."""
    ref = _generate(model, device)
    with torch.no_grad():
        ref_logits = model(PROMPT.to(device)).logits.cpu()
    return ref, ref_logits

def _count_routed(rt):
    """Routed (token-distinct) expert accesses, counted independently of the cache."""
    seen = {"n": 0}

    def hook(module, args):
        seen["n"] += int(torch.unique(args[1]).numel())

    handles = [
        rt.adapter.experts_module(rt.model, layer).register_forward_pre_hook(hook)
        for layer in rt.spec.moe_layers
    ]
    return seen, handles


def _check(model, ref, ref_logits, device="cpu", **kw):
    rt = install(model, device=device, **kw)
    for original in rt._originals.values():  # the store holds the routed weights: no second copy
        assert all(getattr(original, name).numel() == 0 for name in rt.adapter.tensor_names)
    seen, handles = _count_routed(rt)
    out = _generate(model, device)
    c = rt.counters.copy()
    for h in handles:
        h.remove()
    restored = rt.uninstall()
    assert restored is model
    assert rt.cache.store.arena is None and rt.cache.pool.buffer is None  # a kept runtime holds no experts
    assert rt.counters == c  # but its counters stay readable
    assert torch.equal(out, ref), f"tokens differ with {kw}"
    assert c.hits + c.misses == c.accesses == seen["n"]
    assert c.prefetches_issued == c.prefetches_used + c.prefetches_wasted
    assert c.decode_tokens == NEW_TOKENS - 1 and c.prefill_tokens == PROMPT.numel()
    with torch.no_grad():
        assert torch.equal(model(PROMPT.to(device)).logits.cpu(), ref_logits)  # uninstall restores outputs
    return c


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_tokens_identical_for_every_capacity(arch):
    model = tiny_moe_model(arch)
    ref, ref_logits = _reference(model)
    originals = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    total = len(originals) * model.config.num_experts if hasattr(model.config, "num_experts") else None
    for capacity in (1, 0.5, 1.0):
        c = _check(model, ref, ref_logits, capacity=capacity)
        if capacity == 1 and isinstance(capacity, int):  # one slot: every expert change is a miss
            assert c.misses > c.hits
        if isinstance(capacity, float) and capacity == 1.0 and total:
            assert c.misses <= total  # all resident: only cold misses
    assert [m for n, m in model.named_modules() if n.endswith("mlp.experts")] == originals


@pytest.mark.parametrize(
    "kw",
    [
        dict(capacity=0.5, policy="lfu"),
        dict(capacity=0.5, per_layer=True, prefetch="cooc"),
        dict(capacity=2, prefetch="cooc", budget=3),
    ],
)
def test_policies_and_cooccurrence_prefetch_keep_tokens(kw):
    model = tiny_moe_model("olmoe")
    ref, ref_logits = _reference(model)
    c = _check(model, ref, ref_logits, **kw)
    if kw.get("prefetch") == "cooc":
        assert c.prefetches_issued > 0


def test_a_prompt_given_as_embeddings_counts_and_resets_and_installing_twice_is_refused():
    """A prompt given as embeddings counts its prefill tokens and resets the predictor's state (it
    continued the last request's); a second install on the same model is refused by name."""
    model = tiny_moe_model("olmoe")
    rt = install(model, device="cpu", capacity=3)
    with pytest.raises(ValueError, match="already has an offloading runtime"):
        install(model, device="cpu", capacity=3)
    rt.uninstall()
    rt = install(model, device="cpu", capacity=3, predictor=_tiny_predictor(model, "token_ahead"), policy="predictor")
    _generate(model)
    rt.reset_counters()
    resets = {"n": 0}
    reset = rt.driver.reset
    rt.driver.reset = lambda: (resets.__setitem__("n", resets["n"] + 1), reset())[1]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(PROMPT)
        model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
    assert rt.counters.prefill_tokens == PROMPT.numel() and rt.counters.decode_tokens == 2 and resets["n"] == 1
    rt.uninstall()


def _tiny_predictor(model, mode, **overrides):
    num_layers = len([n for n, _ in model.named_modules() if n.endswith("mlp.experts")])
    return tiny_predictor(vocab_size=model.config.vocab_size, num_layers=num_layers, mode=mode, **overrides)


# a routing memory shorter than prompt + generation, so its ring buffer wraps while decoding
MEMORY = {"memory_heads": 1, "memory_head_dim": 4, "memory_size": 3}
BANK = {"bank_size": 2, "bank_recent": 4}  # a routing bank (layer_ahead only): two rows per token id, 4 recent tokens
LEAN = {"depth_blocks": 0, "depth_last": True, **BANK}  # no depth attention: served by predictor/layer_steps.py
EXTRAS = {"": {}, "memory": MEMORY, "memory-bank": {**MEMORY, **BANK}, "lean": LEAN}


@pytest.mark.parametrize(
    "mode,extra",
    [("token_ahead", ""), ("token_ahead", "memory"), ("layer_ahead", ""), ("layer_ahead", "memory"),
     ("layer_ahead", "memory-bank"), ("layer_ahead", "lean")],
)
def test_predictor_prefetch_keeps_tokens_and_counts(mode, extra, tmp_path):
    from predictor.export import export_predictor

    model = tiny_moe_model("olmoe")
    ref, ref_logits = _reference(model)
    predictor = _tiny_predictor(model, mode, **EXTRAS[extra])
    path = export_predictor(predictor, tmp_path / "p.safetensors")
    c = _check(model, ref, ref_logits, predictor=path, capacity=4, policy="predictor")
    assert c.predictor_steps == NEW_TOKENS - 1  # one incremental step per decode token
    assert c.prefetches_issued > 0 and c.predictor_ms > 0


def test_a_one_token_prompt_is_a_prefill_not_a_decode_step():
    """Decode steps are the ones that extend a sequence with a KV cache: a one-token prompt is its prefill."""
    model = tiny_moe_model("olmoe")
    rt = install(model, device="cpu", capacity=4)
    try:
        with torch.no_grad():
            model.generate(PROMPT[:, :1], max_new_tokens=NEW_TOKENS, do_sample=False)
        c = rt.counters.copy()
    finally:
        rt.uninstall()
    assert (c.prefill_tokens, c.decode_tokens) == (1, NEW_TOKENS - 1)


def test_an_install_that_fails_puts_the_model_back(monkeypatch):
    """An install stopped part way (here: the model's move to the device fails, as an OOM or a Ctrl-C
    would) leaves the model as it was: its experts modules and weights, its tokens."""
    model = tiny_moe_model("olmoe")
    ref, _ = _reference(model)
    modules = [type(m) for m in model.modules()]

    move, calls = type(model).to, []

    def fail_once(self, *args, **kwargs):  # the install's move fails; the uninstall's (back home) works
        calls.append(args)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return move(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "to", fail_once)
    with pytest.raises(KeyboardInterrupt):
        install(model, device="cpu", capacity=4)
    monkeypatch.undo()
    assert len(calls) == 2 and [type(m) for m in model.modules()] == modules
    assert torch.equal(_generate(model), ref)


@pytest.mark.parametrize("mode", ["token_ahead", "layer_ahead"])
def test_learned_eviction_keeps_tokens_and_reads_the_files_hazard(mode, tmp_path):
    """The part-1 scheduler's eviction in the runtime (`policy="learned"`): exact tokens, the predictor's
    probabilities and the reuse hazard its file carries inform it; a file without a hazard warns."""
    import numpy as np

    from predictor.export import export_predictor
    from predictor.simulate.policy import ReuseHazard

    model = tiny_moe_model("olmoe")
    ref, ref_logits = _reference(model)
    predictor = _tiny_predictor(model, mode)
    c = predictor.config
    hazard = ReuseHazard(np.full((c.num_layers, 4), 0.2), np.linspace(0.5, 2, c.num_layers * c.num_experts)
                         .reshape(c.num_layers, c.num_experts))  # fmt: skip
    path = export_predictor(predictor, tmp_path / "p.safetensors", hazard=hazard)
    rt = install(model, device="cpu", capacity=4, policy="learned", predictor=path)
    x = rt.cache.pool.expected
    assert x is not None and np.allclose(x.hazard[:, : c.num_experts], hazard.factor)
    _generate(model, "cpu")
    # it was fed: the clock ran a step per forward, the picks' probabilities and the uses arrived
    assert x.tok == NEW_TOKENS and x.tok0 == 0 and (x.krow >= 0).sum() >= c.top_k and (x.last_tok >= 1).any()
    assert rt.counters.hits + rt.counters.misses > 0
    rt.reset_counters()  # after a warm-up: the counters start again, the cache keeps what it holds
    assert rt.counters.hits == rt.counters.misses == rt.counters.prefetches_issued == 0
    rt.uninstall()
    counters = _check(model, ref, ref_logits, predictor=path, capacity=4, policy="learned")
    assert counters.prefetches_issued > 0 and counters.hits > 0
    bare = export_predictor(predictor, tmp_path / "bare.safetensors")
    with pytest.warns(UserWarning, match="no reuse hazard"):
        _check(model, ref, ref_logits, predictor=bare, capacity=4, policy="learned")


def test_layer_ahead_reads_routing_and_picks_back_at_once(tmp_path, monkeypatch):
    """With the predictor beside the routing, a layer's routing and the picks predicted from it come back in
    one readback (one host sync per layer, not two); tokens, prefetches and recall equal those of the
    path that reads the routing first (a predictor on another device)."""
    from integrate.runtime.prefetch import LayerAhead
    from predictor.export import export_predictor

    model = tiny_moe_model("olmoe")
    ref, ref_logits = _reference(model)
    predictor = _tiny_predictor(model, "layer_ahead", **BANK)
    path = export_predictor(predictor, tmp_path / "p.safetensors")
    cpu, calls = torch.Tensor.cpu, {"n": 0}
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.__setitem__("n", calls["n"] + 1) or cpu(self, *a, **k))
    runs = []
    for beside in (True, False):
        monkeypatch.setattr(LayerAhead, "_beside", lambda self, t, b=beside: b)
        calls["n"] = 0
        c = _check(model, ref, ref_logits, predictor=path, capacity=4, policy="predictor")
        runs.append((calls["n"], c.prefetches_issued, c.predicted_routed, c.routed_scored, c.hits))
    (one, *same), (two, *other) = runs
    L = predictor.config.num_layers  # layer_ahead h = 1 predicts layers 1..L-1 from the routing
    assert two - one == (NEW_TOKENS - 1) * (L - 1) and same == other and same[0] > 0


def test_layer_steps_pick_what_model_logits_picks(tmp_path, monkeypatch):
    """On the host, a predictor without depth attention is served by LayerSteps (running sums); the
    prefetches, predicted routing and hits equal those of model.logits for every call."""
    import integrate.runtime.prefetch as prefetch
    from predictor.export import export_predictor
    from predictor.layer_steps import LayerSteps

    model = tiny_moe_model("olmoe")
    ref, ref_logits = _reference(model)
    path = export_predictor(_tiny_predictor(model, "layer_ahead", **LEAN), tmp_path / "p.safetensors")
    made = []

    def chosen(p, fast):  # LayerSteps (recorded), or model.logits for the one layer
        if fast:
            made.append(LayerSteps(p))
            return made[-1]
        return lambda ctx, routed, layer, state: p.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0]

    runs = []
    for fast in (True, False):
        monkeypatch.setattr(prefetch, "layer_logits", lambda p, f=fast: chosen(p, f))
        c = _check(model, ref, ref_logits, predictor=path, capacity=4, policy="predictor")
        runs.append((c.prefetches_issued, c.predicted_routed, c.routed_scored, c.hits))
    assert len(made) == 1 and runs[0] == runs[1] and runs[0][0] > 0


@pytest.mark.parametrize("mode,extra", [("token_ahead", ""), ("layer_ahead", "memory-bank"), ("layer_ahead", "lean")])
def test_predictor_worker_waiting_prefetches_what_the_in_process_driver_does(mode, extra, tmp_path):
    """The predictor in a worker process (integrate/runtime/predictor_worker.py), the host waiting for each
    layer's picks where the in-process driver makes them: the same prefetches, hits and recall, the same
    tokens; without waiting, the tokens are the same and the counters consistent (what comes back too
    late is dropped and counted)."""
    from predictor.export import export_predictor

    model = tiny_moe_model("olmoe")
    ref, ref_logits = _reference(model)
    path = export_predictor(_tiny_predictor(model, mode, **EXTRAS[extra]), tmp_path / "p.safetensors")
    same = lambda c: (c.prefetches_issued, c.prefetches_used, c.hits, c.predicted_routed, c.routed_scored)  # noqa: E731
    inproc = _check(model, ref, ref_logits, predictor=path, capacity=4, policy="predictor")
    waited = _check(model, ref, ref_logits, predictor=path, capacity=4, policy="predictor", predictor_worker="wait")
    assert same(waited) == same(inproc) and inproc.prefetches_issued > 0 and waited.predictions_late == 0
    assert waited.predictor_steps == inproc.predictor_steps == NEW_TOKENS - 1
    free = _check(model, ref, ref_logits, predictor=path, capacity=4, policy="predictor", predictor_worker=True)
    # every decode layer is scored: a layer whose picks came back late counts as predicting none of its
    # experts (it was left out, so the recall was that of the layers the worker kept up with)
    assert free.predictor_steps == NEW_TOKENS - 1 and free.routed_scored == inproc.routed_scored
    assert free.predicted_routed <= inproc.predicted_routed
    assert waited.predictions_dropped == free.predictions_dropped == 0  # the host read every reply in time


def test_a_workers_picks_back_before_a_layer_routes_are_used_for_it(tmp_path, monkeypatch):
    """Layer 0's picks (every layer's, token_ahead) back before its routing is read back: the host takes them
    then, not after (it read the routing first, so layer 0's picks were always late)."""
    import time

    from integrate.runtime.async_prefetch import AsyncPredictor
    from predictor.export import export_predictor

    model = tiny_moe_model("olmoe")
    ref, ref_logits = _reference(model)
    path = export_predictor(_tiny_predictor(model, "token_ahead"), tmp_path / "p.safetensors")
    begin = AsyncPredictor.begin_step

    def begin_then_let_the_worker_answer(self, token_ids, padding=None):  # a host slower than the worker
        begin(self, token_ids, padding)
        deadline = time.monotonic() + 30
        while self.decoding and self.worker._replies.used.get_value() < self.num_layers and time.monotonic() < deadline:
            time.sleep(0.001)

    monkeypatch.setattr(AsyncPredictor, "begin_step", begin_then_let_the_worker_answer)
    c = _check(model, ref, ref_logits, predictor=path, capacity=4, policy="predictor", predictor_worker=True)
    assert c.predictions_late == 0 and c.predictor_steps == NEW_TOKENS - 1 and c.prefetches_issued > 0


def test_a_worker_that_dies_mid_step_leaves_the_model_uninstallable(tmp_path):
    """The predictor worker killed between the prompt and a decode step: that step raises the worker's
    error, settling it fails once more (uninstall warns instead), and the model comes back whole."""
    from integrate.runtime.offloaded_experts import OffloadedExperts
    from predictor.export import export_predictor

    model = tiny_moe_model("olmoe")
    _, ref_logits = _reference(model)
    path = export_predictor(_tiny_predictor(model, "layer_ahead"), tmp_path / "p.safetensors")
    rt = install(model, predictor=path, capacity=4, policy="predictor", device="cpu", predictor_worker=True)
    with torch.no_grad():
        out = model(PROMPT, use_cache=True)
        rt.driver.worker.proc.kill()
        rt.driver.worker.proc.join(5)
        step = PROMPT[:, -1:]
        with pytest.raises(RuntimeError, match="exited"):
            model(step, past_key_values=out.past_key_values, use_cache=True)
    with pytest.warns(UserWarning, match="uninstalling anyway"):
        rt.uninstall()
    assert not any(isinstance(m, OffloadedExperts) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, ref_logits)


def test_predictor_worker_errors_name_the_problem(tmp_path):
    from predictor.export import export_predictor

    model = tiny_moe_model("olmoe")
    path = export_predictor(_tiny_predictor(model, "layer_ahead"), tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="predictor_worker"):
        install(model, predictor=path, device="cpu", predictor_worker="sometimes")
    with pytest.raises(ValueError, match="predictor_device"):
        install(model, predictor=path, device="cpu", predictor_worker=True, predictor_device="cuda")


def test_predictor_shape_mismatch_is_refused():
    from predictor.model import ExpertPredictor, PredictorConfig

    model = tiny_moe_model("olmoe")
    bad = ExpertPredictor(
        PredictorConfig(vocab_size=320, num_layers=5, num_experts=8, top_k=2, d_model=16, n_heads=2)
    )
    with pytest.raises(ValueError, match="L=5"):
        install(model, predictor=bad, device="cpu")


# ---------------------------------------------------------------- CUDA: streams, events, pinned memory


@pytest.mark.gpu
def test_cuda_store_is_pinned_and_copies_are_exact():
    store = fake_store(pin=True)
    assert store.pinned and store.arena.is_pinned()
    cache = ExpertCache(store, 1, "cuda")
    outs = []
    for layer, e in [(0, 1), (0, 2), (1, 3), (2, 4)]:
        w = cache.fetch(layer, e)["w"]
        outs.append((w * 1).sum())  # compute on the slot before the next fetch may overwrite it
    cache.end_step()
    assert [float(o) for o in outs] == [
        12.0 * (100 * layer + e) for layer, e in [(0, 1), (0, 2), (1, 3), (2, 4)]
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_greedy_tokens_identical(arch):
    model = tiny_moe_model(arch).to("cuda")
    # on a GPU, generate() swaps grouped_mm for batched_mm while decoding; the adapters replicate
    # eager and grouped_mm bit for bit, so both runs use eager
    model.set_experts_implementation("eager")
    ref, ref_logits = _reference(model, "cuda")
    for capacity in (1, 0.5, 1.0):
        _check(model, ref, ref_logits, device="cuda", capacity=capacity)
    _check(model, ref, ref_logits, device="cuda", capacity=2, prefetch="cooc")


def test_cli_decode_matches_unpatched_model(tmp_path, capsys):
    from tiny_models import tiny_tokenizer

    from integrate.__main__ import main

    tiny_moe_model("olmoe").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    rc = main(
        [
            "decode",
            "--model",
            str(tmp_path / "model"),
            "--capacity",
            "3",
            "--prefetch",
            "cooc",
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--prompts",
            "hello world",
            "the fox",
            "--check",
            "--json",
            str(tmp_path / "c.json"),
            "--threads",
            "1",
            "--hybrid",
            "pool",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tokens identical to the unpatched model" in out and "hit rate" in out
    assert json.loads((tmp_path / "c.json").read_text())["host_experts"] > 0  # misses ran on the host's pool
    with pytest.raises(SystemExit):  # refused before the model loads
        main(["decode", "--model", str(tmp_path / "model"), "--threads", "0"])
    assert "--threads: must be >= 1, got 0" in capsys.readouterr().err


def test_cli_hybrid_flag_names_where_the_host_experts_run(monkeypatch):
    import integrate.__main__ as cli

    seen = {}
    monkeypatch.setattr(cli, "decode", lambda args: seen.update(cli._settings(args)) or 0)
    assert cli.main(["decode", "--hybrid"]) == 0 and seen["hybrid"] == "thread"  # bare: the calling thread
    assert cli.main(["decode", "--hybrid", "pool"]) == 0 and seen["hybrid"] == "pool"
    assert cli.main(["decode"]) == 0 and seen["hybrid"] is False


def _decode_cli(tmp_path, capsys, *flags) -> str:
    """`python -m integrate decode` of a saved tiny model with a lean layer_ahead predictor, checked
    against the unpatched model; its printed output."""
    from tiny_models import tiny_tokenizer

    from integrate.__main__ import main
    from predictor.export import export_predictor

    model = tiny_moe_model("olmoe")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    path = export_predictor(_tiny_predictor(model, "layer_ahead", **LEAN), tmp_path / "run" / "predictor.safetensors")
    path = path.parent  # a run's folder names its predictor too
    with pytest.raises(FileNotFoundError, match="--model=.*missing/model: no such directory"):
        main(["decode", "--model", str(tmp_path / "missing" / "model"), "--device", "cpu", "--prompts", "hi"])
    rc = main(["decode", "--model", str(tmp_path / "model"), "--predictor", str(path), "--capacity", "0.25",
               *flags, "--device", "cpu", "--max-new-tokens", "4", "--prompts", "hello world", "--check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tokens identical to the unpatched model" in out
    return out


def test_cli_decode_with_the_predictor_in_a_worker(tmp_path, capsys):
    assert "(AsyncPredictor)" in _decode_cli(tmp_path, capsys, "--policy", "predictor", "--predictor-worker", "async")


def test_cli_decode_schedule_sets_the_cache_and_flags_override_it(tmp_path, capsys):
    import argparse

    from integrate.__main__ import _settings, main

    def settings(**given):
        keys = dict(schedule=None, policy=None, threshold=None, max_inflight=None, hybrid=None)  # None: not given
        return _settings(argparse.Namespace(**(keys | given)))

    assert settings() == dict(policy="lru", threshold=0.0, max_inflight=8, hybrid=False)
    assert settings(schedule="scheduler") == dict(policy="learned", threshold=pytest.approx(1 / 3), max_inflight=4,
                                                  hybrid=False)
    assert settings(schedule="naive")["policy"] == "predictor"
    assert settings(schedule="scheduler", policy="lru", max_inflight=2, hybrid="thread") == dict(
        policy="lru", threshold=pytest.approx(1 / 3), max_inflight=2, hybrid="thread")
    assert settings(schedule="hybrid_lru")["hybrid"] is True  # the schedule's; --hybrid pool says where
    assert settings(schedule="hybrid_lru", hybrid="pool")["hybrid"] == "pool"
    assert settings(max_inflight=0, threshold=0.0)["max_inflight"] == 0  # given, so checked, and refused:
    with pytest.raises(SystemExit):
        main(["decode", "--schedule", "scheduler", "--max-inflight", "0"])
    assert "max_inflight (--max-inflight) = 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["decode", "--batch-size", "0"])  # refused before the model loads
    assert "--batch-size 0: prompts per generate() call" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["decode", "--device", "gpu"])  # refused before the model loads
    assert "--device=gpu: not a device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["decode", "--temperature", "0.5"])  # refused before the model loads (it was after, exit 1)
    assert e.value.code == 2 and "--temperature, --top-p and --top-k need --do-sample" in capsys.readouterr().err
    if not torch.cuda.is_available():  # was a traceback from pinning host memory, once the model had loaded
        with pytest.raises(SystemExit):
            main(["decode", "--predictor-device", "cuda"])
        assert "--predictor-device=cuda requested but torch sees no CUDA device" in capsys.readouterr().err
    assert "policy learned, prefetch predictor" in _decode_cli(tmp_path, capsys, "--schedule", "scheduler")
    import warnings

    import integrate.runtime

    got, real = [], integrate.runtime.install

    def install(model, **kw):
        got.append((kw["prefetch"], kw["threshold"]))
        return real(model, **kw)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setattr(integrate.runtime, "install", install)
        warnings.filterwarnings("error", message="threshold")  # the schedule's admission cut is the predictor's:
        out = _decode_cli(tmp_path, capsys, "--schedule", "scheduler", "--prefetch", "predictor", "cooc")  # not cooc's
    assert "prefetch cooc" in out and got == [("predictor", pytest.approx(1 / 3)), ("cooc", 0.0)]
    # the README's form: install(model, **schedule_settings(name)), every name the CLI offers
    from integrate.runtime.drivers import schedule_settings

    model = tiny_moe_model("olmoe")
    for name in ("naive", "scheduler", "scheduler_load"):
        rt = install(model, predictor=_tiny_predictor(model, "layer_ahead", **LEAN), prefetch="predictor",
                     device="cpu", **schedule_settings(name))
        assert rt.cache.max_inflight == (8 if name == "naive" else 4)
        rt.uninstall()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["token_ahead", "layer_ahead"])
def test_cuda_predictor_prefetch_keeps_tokens(mode):
    model = tiny_moe_model("olmoe").to("cuda")
    model.set_experts_implementation("eager")
    ref, ref_logits = _reference(model, "cuda")
    for capacity in (2, 12):  # prefetches into slots still being read, and plenty of room
        c = _check(
            model,
            ref,
            ref_logits,
            device="cuda",
            capacity=capacity,
            policy="predictor",
            predictor=_tiny_predictor(model, mode),
        )
        assert c.prefetches_issued > 0 and c.bytes_moved > 0
    # the predictor on the host, the experts on the GPU: same tokens, picks with no readback
    rt = install(model, device="cuda", capacity=2, policy="predictor", predictor=_tiny_predictor(model, mode),
                 predictor_device="cpu")
    assert rt.driver.device.type == "cpu" and rt.cache.device.type == "cuda"
    out = _generate(model, "cuda")
    issued = rt.counters.prefetches_issued
    rt.uninstall()
    assert torch.equal(out, ref) and issued > 0


def test_predictor_device_is_where_the_driver_runs():
    """`predictor_device` places the predictor (and its picks) apart from the slots; on a CPU-only
    machine both are the host, and the tokens stay the unpatched model's."""
    model = tiny_moe_model("olmoe")
    ref, ref_logits = _reference(model)
    rt = install(model, capacity=2, policy="predictor", predictor=_tiny_predictor(model, "token_ahead"),
                 predictor_device="cpu")
    assert rt.driver.device == torch.device("cpu") and next(rt.driver.predictor.parameters()).device.type == "cpu"
    out = _generate(model)
    issued = rt.counters.prefetches_issued
    rt.uninstall()
    assert torch.equal(out, ref) and issued > 0
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref_logits)


def _graphed_equals_eager(extra: str, device: str, capture: bool) -> None:
    """Two sequences of 5 tokens, a new context and routing every token: the graphs' static context
    and state copies must follow each token and each new sequence (memory ring wraps; bank rows and
    recent tokens change)."""
    from synthetic import tiny_predictor

    from integrate.runtime.graphed import GraphedLayerLogits

    overrides = dict(EXTRAS[extra])
    predictor = tiny_predictor(num_layers=5, num_experts=8, top_k=2, mode="layer_ahead", lookahead=1, **overrides)
    predictor = predictor.to(device)
    graphed = GraphedLayerLogits(predictor, capture=capture)
    g = torch.Generator().manual_seed(0)
    for first in (1, 2):
        state, prev = predictor.init_state(1), None
        for t in range(5):
            token = torch.tensor([first + t if t != 3 else 38], device=device)  # 38: no bank rows
            ctx = predictor.step(state, token, prev)
            routed = torch.randint(0, 8, (1, 1, 5, 2), generator=g).to(device)
            for layer in range(5):
                cur = routed[:, :, : max(0, layer)]  # the runtime passes the layers routed so far
                eager = predictor.logits(ctx, cur, slice(layer, layer + 1), state)[:, 0, 0]
                torch.testing.assert_close(graphed(ctx, cur, layer, state).clone(), eager)
            prev = routed[:, 0]
    assert len(graphed._graphs) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("extra", list(EXTRAS))
def test_graphed_layer_logits_equal_eager(extra):
    _graphed_equals_eager(extra, "cuda", capture=True)


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_graphed_static_copies_follow_each_token_and_sequence(extra):
    """The same check without capturing (plain tensor copies into the static buffers): runs on CPU."""
    _graphed_equals_eager(extra, "cpu", capture=False)


@pytest.mark.parametrize("run", ["thread", "pool"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hybrid_computes_misses_from_the_host_store_with_identical_tokens(arch, run, monkeypatch):
    """Hybrid on a CPU device: every miss runs from the store (no copy), tokens stay identical; a layer
    with both resident experts and misses runs as two grouped calls, one per side, not expert by expert;
    with run="pool" the host's side runs on the pool's thread, the device's on the caller's."""
    import threading

    from integrate.adapters import get_adapter

    model = tiny_moe_model(arch)
    ref, ref_logits = _reference(model)
    parts, cls = [], type(get_adapter(model))
    orig = cls.routed_pool_pairs

    def spy(self, *a, **kw):  # (one part of a mixed layer?, computed on the pool's thread?)
        parts.append((a[7] is not None, threading.current_thread().name == "hybrid-host-pool"))
        return orig(self, *a, **kw)

    monkeypatch.setattr(cls, "routed_pool_pairs", spy)
    monkeypatch.setattr(cls, "routed_forward", lambda *a: pytest.fail("a grouped_mm layer ran expert by expert"))
    hybrid = True if run == "thread" else run
    c = _check(model, ref, ref_logits, capacity=0.25, hybrid=hybrid)
    assert c.host_experts == c.misses > 0 and c.demand_loads == 0 and c.bytes_moved == 0
    assert parts and not any(mixed for mixed, _ in parts)  # nothing is ever copied in: every layer runs whole
    assert all(pool == (run == "pool") for _, pool in parts)  # on the host, on the pool's thread or this one
    parts.clear()
    c = _check(model, ref, ref_logits, capacity=0.25, hybrid=hybrid, prefetch="cooc")  # prefetches fill slots
    assert c.host_experts == c.misses > 0 and c.demand_loads == 0 and c.hits > 0
    assert any(mixed for mixed, _ in parts)  # layers mixed: prefetched experts from the slots, misses from the store
    on_pool = [pool for _, pool in parts]
    assert not all(on_pool) and any(on_pool) == (run == "pool")  # the slots' part always on this thread


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_mm_runs_transformers_own_call_over_the_slot_pool(arch, monkeypatch):
    """batched_mm (generate() on a GPU switches grouped_mm to it while decoding): a layer whose routed experts
    fit its slots runs transformers' batched_mm over the pool, gathered by slot: greedy tokens and logits
    identical to the unpatched batched_mm model; a layer that cannot hold them at once is refused by name."""
    from integrate.adapters import get_adapter

    model = tiny_moe_model(arch)
    model.set_experts_implementation("batched_mm")
    ref, ref_logits = _reference(model)
    cls = type(get_adapter(model))
    calls = []
    orig = cls.routed_pool_batched
    monkeypatch.setattr(cls, "routed_pool_batched", lambda self, *a: calls.append(1) or orig(self, *a))
    monkeypatch.setattr(cls, "routed_forward", lambda *a: pytest.fail("a batched_mm layer ran expert by expert"))
    E = get_adapter(model).spec(model).num_experts
    c = _check(model, ref, ref_logits, capacity=E)  # one layer's worth of slots: every layer fits, misses happen
    assert calls and c.misses > 0
    rt = install(model, device="cpu", capacity=E)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref_logits)  # the runtime's own logits, installed
    rt.uninstall()
    rt = install(model, device="cpu", capacity=1, prefetch="cooc")
    with pytest.raises(NotImplementedError, match=r"batched_mm: MoE layer 0 routes \d+ experts at once, more than the 1"):
        _generate(model)
    rt.uninstall()  # settles the step the refusal left open
    c = rt.counters
    assert c.prefetches_issued == c.prefetches_used + c.prefetches_wasted


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "gpt_oss"])
def test_cuda_generate_with_grouped_mm_keeps_tokens(arch):
    """On a GPU generate() prefills with grouped_mm and decodes with batched_mm: the runtime runs both over
    the slot pool (grouped calls, then transformers' batched_mm gathered by slot); tokens stay identical."""
    from integrate.adapters import get_adapter

    model = tiny_moe_model(arch).to("cuda", torch.bfloat16)
    ref, ref_logits = _reference(model, "cuda")
    _check(model, ref, ref_logits, device="cuda", capacity=get_adapter(model).spec(model).num_experts)
    model.set_experts_implementation("batched_mm")  # hybrid's rule times a batched_mm expert on the host
    rt = install(model, device="cuda", capacity=0.5, hybrid="pool")
    assert rt.cache.hybrid.cpu_expert_ms > 0
    rt.uninstall()


def test_hybrid_rule_is_the_simulators():
    from integrate.runtime.hybrid import HybridRule

    assert HybridRule().host_first(3, 10**6)  # CPU device: always from the store
    rule = HybridRule(link_gbps=1.0, cpu_expert_ms=2.5)  # 1 MB copy: 1 ms per copy on the link
    assert not rule.host_first(0, 10**6)  # lands after 1 ms: copy
    assert rule.host_first(2, 10**6)  # behind two in flight, lands after 3 ms: the CPU's 2.5 ms win


def test_split_host_decides_misses_in_order_against_the_link_and_the_host_queue():
    """Copies of 1 ms each (nothing in flight on CPU), 2.5 ms per host expert: a miss goes to the host
    once the copies queued ahead of it would land later than the host, running the misses it already
    has, finishes it; resident experts always stay on the device."""
    from integrate.runtime.hybrid import HybridRule
    from integrate.runtime.store import ExpertLayout

    store = ExpertStore(ExpertLayout({"w": torch.empty(2**20, dtype=torch.uint8)}), 1, 8, pin=False)
    cache = ExpertCache(store, 2, "cpu", hybrid=HybridRule(link_gbps=2**20 / 1e6, cpu_expert_ms=2.5))
    cache.warm([(0, 0)])
    host, device = cache.split_host(0, [0, 1, 2, 3, 4, 5, 6, 7])
    # 1: lands at 1 ms < 2.5 (copy); 2: at 2 ms (copy); 3: at 3 ms > 2.5 (host); 4: host done at 5 ms,
    # copy at 3 ms (copy); 5: 4 ms, 6: 5 ms (copies: not later than the host); 7: 6 ms > 5 (host)
    assert host == [3, 7] and device == [0, 1, 2, 4, 5, 6]
    assert ExpertCache(store, 2, "cpu").split_host(0, [1, 2]) == ([], [1, 2])  # no hybrid rule: all copied


def test_a_pool_larger_than_one_grouped_call_takes_keeps_tokens(monkeypatch):
    """More slots than one grouped GEMM takes (torch's CUDA kernel refuses 1024 groups; here the limit is
    lowered to 3): the layer's experts run in windows over the used slots, tokens unchanged."""
    import integrate.grouping as grouping
    import integrate.runtime.offloaded_experts as oe
    from integrate.adapters import get_adapter

    monkeypatch.setattr(grouping.pool_windows, "__defaults__", (3, 16))  # max_groups 3
    monkeypatch.setattr(oe, "WINDOWS_FROM", 3)
    model = tiny_moe_model("olmoe")
    model.set_experts_implementation("grouped_mm")
    ref, ref_logits = _reference(model)
    calls = []
    orig = type(get_adapter(model)).routed_pool_pairs

    def spy(self, *a, **kw):
        calls.append(a[6] if len(a) > 6 else kw.get("windows"))
        return orig(self, *a, **kw)

    monkeypatch.setattr(type(get_adapter(model)), "routed_pool_pairs", spy)
    _check(model, ref, ref_logits, capacity=1.0)
    assert calls and all(w is not None for w in calls) and max(len(w) for w in calls) > 1
    assert all(hi - lo <= 3 for w in calls for lo, hi, _, _ in w)


def test_a_step_that_raised_leaves_nothing_to_the_next():
    """A forward that raises part-way (a Ctrl-C in generate) leaves issued prefetches unrouted and
    later layers' requests queued; the next step counts them wasted and drops the queue, so the next
    request's counters add up (issued = used + wasted) and its tokens are the model's own."""
    model = tiny_moe_model("olmoe")
    ref, _ = _reference(model)
    rt = install(model, device="cpu", capacity=4, prefetch="cooc", budget=3)
    last = rt.spec.moe_layers[-1]

    def interrupt(module, args):
        raise KeyboardInterrupt

    with torch.no_grad():
        past = model(PROMPT, use_cache=True).past_key_values
        handle = rt.adapter.experts_module(rt.model, last).register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model(PROMPT[:, -1:], past_key_values=past, use_cache=True)  # a decode step: it prefetches
    handle.remove()
    assert rt.cache._unused  # the interrupted step's prefetches for the last layer, never routed
    rt.reset_counters()
    out = _generate(model)
    c = rt.counters
    assert torch.equal(out, ref)
    assert c.prefetches_issued > 0 and c.prefetches_issued == c.prefetches_used + c.prefetches_wasted
    assert c.prefill_tokens == PROMPT.numel() and c.decode_tokens == NEW_TOKENS - 1
    rt.uninstall()


def test_a_ctrl_c_between_taking_slots_and_copying_into_them_waits_for_the_copy():
    """A real SIGINT delivered after a layer's misses took their slots and before their copy call is
    raised once the copy call is made, so no expert is left resident on another's weights; the next
    request, after the step is settled, computes exactly."""
    import os
    import signal

    model = tiny_moe_model("olmoe")
    with torch.no_grad():
        ref_logits = model(PROMPT).logits
    rt = install(model, device="cpu", capacity=12, prefetch="cooc", budget=3)
    cache, copy, calls = rt.cache, rt.cache._copy, []

    def interrupted(batch, demand):
        calls.append(demand)
        if demand and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, between the slots' allocation and this copy
        return copy(batch, demand)

    cache._copy = interrupted
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(PROMPT)
    cache._copy = copy
    assert len(calls) >= 2
    stale = [k for k, s in cache.pool.slot_of.items() if not torch.equal(cache.pool.buffer[s], cache.store.buffer(*k))]
    assert stale == []
    rt.reset_counters()
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref_logits)
    rt.uninstall()
