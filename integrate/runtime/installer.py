"""`install(model, ...)` -> Runtime: swap every MoE layer's experts for offloaded ones (runtime.py)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from integrate.adapters import get_adapter
from integrate.runtime.cache import ExpertCache
from integrate.runtime.capacity import release_expert_weights, resolve_capacity
from integrate.runtime.drivers import PREFETCH, check_settings, make_prefetcher
from integrate.runtime.expected_use import ExpectedUse
from integrate.runtime.host_pool import pool_threads
from integrate.runtime.host_run import HOST_RUNS
from integrate.runtime.hybrid import measure_rule
from integrate.runtime.offloaded_experts import OffloadedExperts
from integrate.runtime.runtime import Runtime
from integrate.runtime.slots import check_policy
from integrate.runtime.store import ExpertLayout, ExpertStore
from predictor.cli import resolve_device

# what the adapters reproduce bit for bit (batched_mm over the slot pool only, every routed expert of a layer
# resident at once; a hybrid layer as grouped_mm, within rounding; generate() on a GPU switches grouped_mm to
# batched_mm while decoding)
ROUTED_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def _model_token_space(model: nn.Module) -> str | None:
    """The token space of the tokenizer at the name or path the model was loaded from (`tokenizer_space`:
    its vocabulary's hash, or `tokenizer:<name>` where it cannot be read; None for a model built in memory)."""
    from predictor.token_space import tokenizer_space

    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return tokenizer_space(name) if name else None


def install(
    model: nn.Module,
    predictor=None,
    capacity: float | int | str = 0.25,
    policy: str = "lru",
    device: str | torch.device | None = None,
    prefetch: str | None = None,
    per_layer: bool = False,
    budget: int | None = None,
    threshold: float = 0.0,
    max_inflight: int | None = None,
    hybrid: bool | str = False,
    token_space: str | None = None,
    predictor_device: str | torch.device | None = None,
    predictor_worker: bool | str = False,
) -> Runtime:
    """Offload `model`'s routed experts to host memory and stream them through `capacity` device slots.

    predictor  an ExpertPredictor or the path of an exported one (predictor.export); its mode picks
               token-ahead or layer-ahead prefetch
    capacity   fraction of all routed experts (0.25), an expert count (12) or a size ("4GiB")
    policy     eviction: "lru", "lfu", "predictor" (prediction-aware LRU) or "learned" (the part-1
               scheduler's: the farthest expected next use, from the predictor's probabilities and the
               reuse hazard its file carries; integrate/runtime/expected_use.py)
    prefetch   "none", "cooc" (previous-layer co-occurrence, learned online), "predictor" or "gate"
               (the next layer's router on the previous layer's hidden state, integrate/runtime/gate.py);
               default: "predictor" when a predictor is given, else "none"
    budget     experts predicted per layer and sequence (default: the model's top_k); with a batch the
               union over its sequences is prefetched, at most the slots one layer can use
    threshold  predictor prefetch only for experts with predicted probability >= threshold (calibrated when
               the predictor file carries a calibration, predictor/calibration.py)
    hybrid     compute a miss on the host CPU from the store when that beats its copy (integrate/runtime/
               hybrid.py; on CUDA the link and one expert's CPU time, where it will run, are measured
               here): True or "thread" on the calling thread, "pool" on a thread of its own in the
               stream's order (host_run.py)
    token_space the token ids' space (predictor/token_space.py; default: `tokenizer_space` of the name or
               path the model was loaded from, the hash of its tokenizer's vocabulary where it can be read):
               a predictor trained on another token space is refused
    max_inflight prefetch copies committed to the copy stream at once (None: the cache's default, 8)
    predictor_device where the predictor runs (default: `device`); "cpu" keeps a small batch-1 predictor
               off the GPU's launch queue and its picks on the host (integrate/runtime/drivers.py)
    predictor_worker True: the predictor runs in a worker process on another host core, off the host
               thread that drives the model (integrate/runtime/async_prefetch.py); "wait": the same,
               waiting for each layer's picks (the in-process driver's prefetches, for checks)
    The rest of the model moves to `device` (default: cuda when available); `uninstall()` undoes all.
    """
    if any(isinstance(m, OffloadedExperts) for m in model.modules()):
        raise ValueError("this model already has an offloading runtime installed: call its uninstall() first")
    adapter = get_adapter(model)
    spec = adapter.spec(model)
    if spec.experts_implementation not in ROUTED_IMPLEMENTATIONS:  # fail before touching the model
        raise ValueError(
            f"experts_implementation {spec.experts_implementation!r} is not replicated by the adapters "
            f"(they replicate {ROUTED_IMPLEMENTATIONS}); call model.set_experts_implementation('grouped_mm') first"
        )
    device = resolve_device(str(device) if device is not None else "auto", "device")  # one this machine has
    prefetch = prefetch or ("predictor" if predictor is not None else "none")
    if prefetch not in PREFETCH:
        raise ValueError(f"prefetch {prefetch!r}: choose from {PREFETCH}")
    L, E = len(spec.moe_layers), spec.num_experts
    check_settings(budget=budget, threshold=threshold, max_inflight=max_inflight, num_experts=E)  # before the copy
    home = next(model.parameters()).device
    originals = {layer: adapter.experts_module(model, layer) for layer in spec.moe_layers}
    mods = list(originals.values())
    # every setting checked before the host copy, which takes minutes and the model's size in pinned memory
    check_policy(policy)
    run = ("thread" if hybrid is True else hybrid) if hybrid else None
    if run is not None and run not in HOST_RUNS:
        raise ValueError(f"hybrid={hybrid!r}: True, or where the host's experts run: one of {sorted(HOST_RUNS)}")
    slots = resolve_capacity(capacity, L, E, ExpertLayout(adapter.expert_tensors(mods[0], 0)).nbytes, per_layer)
    with torch.no_grad():
        store = ExpertStore.from_experts(
            lambda layer, e: adapter.expert_tensors(mods[layer], e), L, E, pin=device.type == "cuda"
        )
    expected = ExpectedUse(L, E, spec.top_k) if policy == "learned" else None  # its hazard: make_prefetcher's
    cache = ExpertCache(store, slots, device, policy, per_layer, max_inflight, expected=expected)
    if slots >= L * E:  # every expert fits: load them all now, in (layer, expert) order, so slots rise with ids
        cache.warm([(layer, e) for layer in range(L) for e in range(E)])
        cache.counters.reset()  # loading, not serving: the counters start with the first token
    if run is not None:
        if run == "pool" and spec.experts_implementation == "eager":
            warnings.warn("hybrid='pool' serves grouped_mm and batched_mm layers; these run 'eager', "
                          "whose host experts compute on the calling thread", stacklevel=2)  # fmt: skip
        threads = pool_threads(predictor_worker=bool(predictor_worker)) if run == "pool" else None
        cache.hybrid = measure_rule(cache, adapter, mods[0], spec.hidden_size, run=run, threads=threads)

    driver = make_prefetcher(
        prefetch, cache, L, E, spec.top_k, predictor=predictor, budget=budget, threshold=threshold, model=model,
        token_space=token_space or _model_token_space(model), vocab_size=getattr(model.config, "vocab_size", None),
        predictor_device=predictor_device, predictor_worker=predictor_worker,
    )

    if policy == "learned" and prefetch != "predictor":
        warnings.warn(f"policy 'learned' with prefetch {prefetch!r}: no predictor's probabilities nor reuse hazard "
                      "reach the learned eviction, which then rates every expert at the mean rate k / E and loses "
                      "recency (LRU does better); use it with a predictor", stacklevel=2)  # fmt: skip
    rt = Runtime(model, adapter, spec, cache, driver, home)
    try:
        for i, (layer, original) in enumerate(originals.items()):
            rt._originals[layer] = original  # first: uninstall puts back whatever was swapped
            adapter.swap_experts(model, layer, OffloadedExperts(adapter, original, cache, i, rt._routed, rt._layer_done))
            rt._released[layer] = release_expert_weights(adapter, original)
        model.to(device)  # the offloaded modules hold no parameters: only the dense part moves
    except BaseException:  # (an OOM, a Ctrl-C while the model moves): put back what was swapped, then stop
        try:
            rt.uninstall()  # also closes the driver: a predictor worker's process, the gate's hooks
        except Exception:
            if driver is not None:
                driver.close()
        raise
    rt._hooks = [
        model.register_forward_pre_hook(rt._pre, with_kwargs=True),
        model.register_forward_hook(rt._post, with_kwargs=True),
    ]
    return rt
