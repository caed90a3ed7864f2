"""Which prefetch driver runs: the one place that picks a driver for a prefetch method and loads the
predictor it needs (used by `install` and by benchmarks/bench_replay.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from integrate.runtime.cache import ExpertCache
from integrate.runtime.gate import GatePrefetcher
from integrate.runtime.gate_inputs import GateInputsAhead
from integrate.runtime.prefetch import CoOccurrencePrefetcher, LayerAhead, TokenAhead
from integrate.runtime.prefetcher import Prefetcher

PREFETCH = ("none", "cooc", "predictor", "gate")


def schedule_settings(name: str) -> dict:
    """The runtime's cache settings for a part-1 scheduling policy (predictor.simulate.policy.POLICIES):
    eviction `lru` stays LRU, `learned` is the pool's learned eviction (`policy="learned"`: the
    simulator's expected-distance score, integrate/runtime/expected_use.py), and the naive prefetcher's
    becomes prediction-aware LRU (`policy="predictor"`: experts outside the latest predictions go first);
    value admission becomes its probability cut (`admission_threshold`); demand first becomes the
    policy's cap on prefetch copies committed to the link (`max_inflight`). Returns
    {policy, threshold, max_inflight (None: the cache's default), hybrid}."""
    from predictor.simulate.policy import POLICIES, admission_threshold

    if name not in POLICIES:
        raise ValueError(f"schedule {name!r}: choose from {sorted(POLICIES)}")
    pol = POLICIES[name]
    if pol.evict in ("belady",):
        raise ValueError(f"schedule {name!r} evicts by the true future: the simulator's reference only")
    return dict(
        policy="predictor" if name == "naive" else pol.evict,
        threshold=admission_threshold(pol),
        max_inflight=pol.max_inflight,
        hybrid=pol.hybrid,
    )


def check_settings(*, budget=None, threshold=0.0, max_inflight=None, num_experts: int | None = None) -> None:
    """The prefetch settings, checked in one place (install, `python -m integrate decode`, the replay
    benchmark); errors name the setting and its CLI flag."""
    top = num_experts or "E"
    if budget is not None and (type(budget) is not int or not 1 <= budget <= (num_experts or budget)):
        raise ValueError(f"budget (--budget) = {budget!r}: experts prefetched per layer must lie in [1, {top}]")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold (--threshold) = {threshold!r}: a probability, must lie in [0, 1)")
    if max_inflight is not None and (type(max_inflight) is not int or max_inflight < 1):
        raise ValueError(f"max_inflight (--max-inflight) = {max_inflight!r}: copies in flight, must be >= 1")


def load_driver_predictor(
    predictor, num_layers: int, num_experts: int, device: str | torch.device, token_space: str | None = None,
    top_k: int | None = None, vocab_size: int | None = None,
):
    """An ExpertPredictor, or the path of an exported one (`predictor.export.load_predictor`), on
    `device` in eval mode; refuses one made for another number of MoE layers or experts, or trained on
    ids of another token space than `token_space` (the served tokenizer's, predictor/token_space.py).
    A predictor that records no token space, or no `token_space` given, loads with a warning. With
    `top_k` / `vocab_size` (the model's), a predictor made for another k or vocabulary is refused too."""
    from predictor.token_space import check_token_space

    where = ""
    if isinstance(predictor, (str, Path)):
        from predictor.export import load_predictor

        where = f"{predictor}: "
        predictor = load_predictor(predictor, map_location=device)
    trained_on = (getattr(predictor, "predictor_meta", None) or {}).get("token_space")
    check_token_space(token_space, "the served model's tokenizer", trained_on, f"the predictor {where}".rstrip(": "))
    c = predictor.config
    if (c.num_layers, c.num_experts) != (num_layers, num_experts):
        raise ValueError(
            f"{where}predictor is for L={c.num_layers}, E={c.num_experts}; "
            f"the routing has L={num_layers}, E={num_experts}"
        )
    if top_k is not None and c.top_k != top_k:
        raise ValueError(f"{where}predictor is for top_k={c.top_k}; the model routes top_k={top_k}")
    if vocab_size is not None and c.vocab_size != vocab_size:
        raise ValueError(
            f"{where}predictor has vocab_size={c.vocab_size}; the model's is {vocab_size} "
            "(trained on another tokenizer's ids: its token embedding would be read at the wrong rows)"
        )
    return predictor.to(device).eval()


def make_prefetcher(
    name: str,
    cache: ExpertCache,
    num_layers: int,
    num_experts: int,
    top_k: int,
    *,
    predictor=None,
    budget: int | None = None,
    threshold: float = 0.0,
    cooc_counts: np.ndarray | None = None,
    model=None,
    token_space: str | None = None,
    vocab_size: int | None = None,
    predictor_device: str | torch.device | None = None,
    predictor_worker: bool | str = False,
) -> Prefetcher | None:
    """The prefetch driver for `name` (one of PREFETCH) over `cache`, or None for "none".

    cooc       CoOccurrencePrefetcher, starting from `cooc_counts` (L-1, E, E) when given (e.g. counted
               on a train split), then learning online
    predictor  TokenAhead or LayerAhead, as the predictor's mode says (GateInputsAhead for one with
               gate_inputs: needs `model`); `predictor` is an ExpertPredictor or the path of an exported
               one, loaded onto the cache's device
    gate       GatePrefetcher: the next layer's own router on the hidden state leaving the layer
               before it (cross-layer gate); needs the transformers `model` it hooks into
    budget     experts prefetched per layer (default top_k); threshold: predictor prefetch only for
               experts with predicted probability >= threshold
    token_space the token-id space of the ids the predictor will read (predictor/token_space.py): a
               predictor trained on another is refused
    vocab_size the model's vocabulary: a predictor with another (or another top_k) is refused
    predictor_device where the predictor runs (default: the cache's device). "cpu" with a CUDA cache: at
               batch 1 a small predictor costs more on the GPU than on the host (the token_ahead step: 4.5 ms on an
               H200, 1 ms on one host core) and its picks are then on the host already (no readback)
    predictor_worker True (or "async"): the predictor runs on the host CPU in a worker process, off the
               host thread (integrate/runtime/async_prefetch.py); "wait": the same, but the host waits
               for each layer's picks where the in-process driver makes them (same prefetches)
    """
    check_settings(budget=budget, threshold=threshold, num_experts=num_experts)
    if name not in PREFETCH:
        raise ValueError(f"prefetch {name!r}: choose from {PREFETCH}")
    if predictor_worker not in (False, True, "async", "wait"):
        raise ValueError(f"predictor_worker (--predictor-worker) = {predictor_worker!r}: False, True / 'async' or 'wait'")
    if predictor_worker and name != "predictor":
        raise ValueError(f"predictor_worker runs a predictor in a worker process: prefetch must be 'predictor', got {name!r}")
    if predictor_worker and predictor_device not in (None, "cpu"):
        raise ValueError(f"predictor_worker runs the predictor on the host CPU; predictor_device={predictor_device!r}")
    if name == "none":
        return None
    if threshold and name in ("cooc", "gate"):  # it cuts a predictor's (calibrated) probabilities
        warnings.warn(f"threshold (--threshold) = {threshold:g} is a predictor's: prefetch {name!r} takes its top "
                      "`budget` picks whatever their score", stacklevel=3)  # fmt: skip
    if name == "cooc":
        driver = CoOccurrencePrefetcher(cache, num_layers, num_experts, top_k, budget)
        if cooc_counts is not None:
            driver.counts += cooc_counts
        return driver
    if name == "gate":
        if model is None:
            raise ValueError("prefetch='gate' needs the model's hidden states (a transformers model to hook)")
        from integrate.adapters import get_adapter

        return GatePrefetcher(cache, model, get_adapter(model), top_k, budget)
    if predictor is None:
        raise ValueError("prefetch='predictor' needs a predictor (module or exported file)")
    where = torch.device("cpu" if predictor_worker else predictor_device if predictor_device is not None else cache.device)
    predictor = load_driver_predictor(predictor, num_layers, num_experts, where, token_space, top_k, vocab_size)
    if cache is not None and cache.pool.expected is not None:  # the learned eviction: the file's hazard
        hazard = getattr(predictor, "reuse_hazard", None)
        if hazard is None:
            warnings.warn("learned eviction: the predictor file carries no reuse hazard, so every expert it does not "
                          "predict is rated at the mean rate k / E; `python -m predictor.export FILE FILE "
                          "--hazard-traces meta` adds it", stacklevel=2)  # fmt: skip
        cache.pool.expected.use_hazard(hazard)
    if predictor_worker:
        if predictor.config.gate_inputs:
            raise ValueError("predictor_worker: a predictor with gate_inputs reads the model's hidden states; "
                             "run it in process")
        from integrate.runtime.async_prefetch import AsyncPredictor

        return AsyncPredictor(cache, predictor, budget, threshold, wait=predictor_worker == "wait")
    if predictor.config.gate_inputs:  # fed the cross-layer gate's picks, which it computes in the model
        if model is None:
            raise ValueError("a predictor with gate_inputs needs the transformers `model` (its gate's picks)")
        from integrate.adapters import get_adapter

        return GateInputsAhead(cache, predictor, model, get_adapter(model), budget, threshold)
    cls = TokenAhead if predictor.config.mode == "token_ahead" else LayerAhead
    return cls(cache, predictor, budget, threshold)
