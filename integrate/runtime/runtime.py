"""`install(model, ...)` -> Runtime: swap every MoE layer's experts for offloaded ones; `Runtime.uninstall()`.

Only the model instance is touched (its `mlp.experts` modules and two forward hooks on the model):
no global monkeypatching. Each forward of the model is one step: the pre-hook starts the prefetch
driver (token-ahead prediction happens here, before any layer runs), the post-hook closes the step
and folds timings into the counters.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from integrate.adapters import get_adapter
from integrate.runtime.cache import ExpertCache
from integrate.runtime.counters import Counters
from integrate.runtime.drivers import PREFETCH, make_prefetcher
from integrate.runtime.offloaded_experts import OffloadedExperts
from integrate.runtime.prefetch import Prefetcher
from integrate.runtime.store import ExpertStore

ROUTED_IMPLEMENTATIONS = ("eager", "grouped_mm")  # what adapter.routed_forward reproduces bit for bit
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def resolve_capacity(capacity, num_layers: int, num_experts: int, expert_bytes: int, per_layer: bool) -> int:
    """Slots for `capacity`: a fraction of all routed experts (float in (0, 1]), a number of experts
    (int), or a size ("4GiB", "500MB"). Per-layer pools round down to a multiple of the layers."""
    total = num_layers * num_experts
    if isinstance(capacity, str):
        m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", capacity)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"capacity {capacity!r}: expected a fraction, an expert count or a size like '4GiB'"
            )
        slots = int(float(m.group(1)) * _UNITS[m.group(2).lower()] // expert_bytes)
    elif isinstance(capacity, float):
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity fraction {capacity} must lie in (0, 1]")
        slots = max(round(capacity * total), num_layers if per_layer else 1)  # a fraction never means none
    else:
        slots = int(capacity)
    slots = min(slots, total)
    if per_layer:
        slots -= slots % num_layers
    if slots < (num_layers if per_layer else 1):
        raise ValueError(
            f"capacity {capacity!r} gives {slots} expert slots; at least "
            f"{num_layers if per_layer else 1} needed (one expert is {expert_bytes} bytes)"
        )
    return slots


def release_expert_weights(adapter, experts: nn.Module) -> dict[str, tuple]:
    """Free `experts`' routed weights (the host store holds a copy); return what `restore` needs.

    Without this the weights would sit in memory twice (three times if the model was on the GPU
    before `install`): in the original module and in the store.
    """
    kept = {}
    for name in adapter.tensor_names:
        p = getattr(experts, name)
        kept[name] = (tuple(p.shape), p.dtype, p.device)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return kept


def restore_expert_weights(adapter, experts: nn.Module, kept: dict[str, tuple], store, moe_index: int) -> None:
    """Re-allocate the weights freed by `release_expert_weights` and copy them back from the store."""
    for name, (shape, dtype, device) in kept.items():
        getattr(experts, name).data = torch.empty(shape, dtype=dtype, device=device)
    with torch.no_grad():
        for e in range(store.num_experts):
            views = adapter.expert_tensors(experts, e)  # views into the re-allocated parameters
            for name, t in store.tensors(moe_index, e).items():
                views[name].copy_(t)


class Runtime:
    def __init__(
        self,
        model: nn.Module,
        adapter,
        spec,
        cache: ExpertCache,
        driver: Prefetcher | None,
        home: torch.device,
    ):
        self.model, self.adapter, self.spec, self.cache, self.driver = model, adapter, spec, cache, driver
        self._home = home
        self._originals: dict[int, nn.Module] = {}
        self._released: dict[int, dict] = {}  # decoder layer -> shapes of the freed expert weights
        self._hooks = []
        self._drive = False
        self._decode = False
        self._t0 = 0.0
        self._step_tokens = 0

    @property
    def counters(self) -> Counters:
        """The live counters (a dataclass; `.copy()` for a snapshot, `.as_dict()` for derived rates too)."""
        return self.cache.counters

    def reset_counters(self) -> None:
        self.cache.counters.reset()

    def uninstall(self) -> nn.Module:
        """Put the original experts modules (weights copied back from the store) and the model on the
        device it was on before install."""
        for i, (layer, original) in enumerate(self._originals.items()):
            restore_expert_weights(self.adapter, original, self._released.pop(layer), self.cache.store, i)
            self.adapter.swap_experts(self.model, layer, original)
        self._originals.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return self.model.to(self._home)

    # -- hooks ------------------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        self._t0 = time.perf_counter()  # the step's time includes token-ahead prediction
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._step_tokens = 0 if ids is None else ids.numel()
        self._decode = ids is not None and ids.shape[-1] == 1
        # prefetch drivers serve batch 1; larger batches run with the cache alone
        self._drive = self.driver is not None and ids is not None and ids.shape[0] == 1
        if self._drive:
            past = kwargs.get("past_key_values")
            if past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0):
                self.driver.reset()
            self.driver.begin_step(ids[0])

    def _routed(self, layer: int, top_k_index: torch.Tensor) -> None:
        if self._drive:
            self.driver.routed(layer, top_k_index)

    def _post(self, module, args, kwargs, output):
        if self._drive:
            self.driver.end_step()
        self.cache.end_step()
        if self.cache.cuda:  # SYNC POINT: the step's work is done (generate reads the logits next anyway)
            torch.cuda.current_stream(self.cache.device).synchronize()
        dt = time.perf_counter() - self._t0
        c = self.cache.counters
        if self._decode:
            c.decode_tokens += self._step_tokens
            c.decode_s += dt
        else:
            c.prefill_tokens += self._step_tokens
            c.prefill_s += dt


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
    max_inflight: int = 8,
) -> Runtime:
    """Offload `model`'s routed experts to host memory and stream them through `capacity` device slots.

    predictor  an ExpertPredictor or the path of an exported one (predictor.export); its mode picks
               token-ahead or layer-ahead prefetch
    capacity   fraction of all routed experts (0.25), an expert count (12) or a size ("4GiB")
    policy     eviction: "lru", "lfu" or "predictor" (prediction-aware LRU)
    prefetch   "none", "cooc" (previous-layer co-occurrence, learned online) or "predictor";
               default: "predictor" when a predictor is given, else "none"
    budget     experts prefetched per layer (default: the model's top_k)
    threshold  predictor prefetch only for experts with predicted probability >= threshold
    The rest of the model moves to `device` (default: cuda when available); `uninstall()` undoes all.
    """
    adapter = get_adapter(model)
    spec = adapter.spec(model)
    if spec.experts_implementation not in ROUTED_IMPLEMENTATIONS:  # fail before touching the model
        raise ValueError(
            f"experts_implementation {spec.experts_implementation!r} is not replicated by the adapters "
            f"(they replicate {ROUTED_IMPLEMENTATIONS}); call model.set_experts_implementation('grouped_mm') first"
        )
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    prefetch = prefetch or ("predictor" if predictor is not None else "none")
    if prefetch not in PREFETCH:
        raise ValueError(f"prefetch {prefetch!r}: choose from {PREFETCH}")
    L, E = len(spec.moe_layers), spec.num_experts
    home = next(model.parameters()).device
    originals = {layer: adapter.experts_module(model, layer) for layer in spec.moe_layers}
    mods = list(originals.values())
    with torch.no_grad():
        store = ExpertStore.from_experts(
            lambda layer, e: adapter.expert_tensors(mods[layer], e), L, E, pin=device.type == "cuda"
        )
    slots = resolve_capacity(capacity, L, E, store.expert_bytes, per_layer)
    cache = ExpertCache(store, slots, device, policy, per_layer, max_inflight)

    driver = make_prefetcher(
        prefetch, cache, L, E, spec.top_k, predictor=predictor, budget=budget, threshold=threshold
    )

    rt = Runtime(model, adapter, spec, cache, driver, home)
    for i, (layer, original) in enumerate(originals.items()):
        adapter.swap_experts(model, layer, OffloadedExperts(adapter, original, cache, i, rt._routed))
        rt._originals[layer] = original
        rt._released[layer] = release_expert_weights(adapter, original)
    model.to(device)  # the offloaded modules hold no parameters: only the dense part moves
    rt._hooks = [
        model.register_forward_pre_hook(rt._pre, with_kwargs=True),
        model.register_forward_hook(rt._post, with_kwargs=True),
    ]
    return rt
