"""`Runtime`: an installed offloading runtime (installer.py builds it); `Runtime.uninstall()` undoes it.

Only the model instance is touched (its `mlp.experts` modules and two forward hooks on the model):
no global monkeypatching. Each forward of the model is one step: the pre-hook starts the prefetch
driver (token-ahead prediction happens here, before any layer runs), the post-hook closes the step
and folds timings into the counters.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch import nn

from integrate.runtime.cache import ExpertCache
from integrate.runtime.capacity import restore_expert_weights
from integrate.runtime.counters import Counters
from integrate.runtime.prefetch import Prefetcher


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
        self._open = False  # a step began and has not ended (it raised part-way)

    @property
    def counters(self) -> Counters:
        """The live counters (a dataclass; `.copy()` for a snapshot, `.as_dict()` for derived rates too)."""
        return self.cache.counters

    def reset_counters(self) -> None:
        """Zero the counters; a step that raised part-way is settled first (`ExpertCache.abort_step`), so
        its prefetches are not counted in the next one's."""
        self._settle()
        self.cache.counters.reset()

    def _settle(self) -> None:
        if self._open:  # the last step raised part-way (a KeyboardInterrupt: no forward hook sees it)
            self._open = False  # settled once: a driver that fails here (a dead worker) raises once, not forever
            self.cache.abort_step()
            if self.driver is not None:  # its step's state is half-advanced: it starts afresh, not decoding
                self.driver.decoding = False
                self.driver.reset()

    def uninstall(self) -> nn.Module:
        """Put the original experts modules (weights copied back from the store) and the model on the
        device it was on before install; a step that raised part-way is settled first (its prefetches
        counted), and if settling fails too (the predictor worker died mid-step) it warns and goes on."""
        try:
            self._settle()
        except Exception as e:
            warnings.warn(f"settling the step that raised part-way failed ({e!r}); uninstalling anyway", stacklevel=2)
        for i, (layer, original) in enumerate(self._originals.items()):
            released = self._released.pop(layer, None)  # None: an install stopped before it was released
            if released is not None:
                restore_expert_weights(self.adapter, original, released, self.cache.store, i)
            self.adapter.swap_experts(self.model, layer, original)
        self._originals.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.driver is not None:
            self.driver.close()  # e.g. the cross-layer gate's hooks on the decoder layers
        self.cache.close()  # the device slots and the host store go once their copies are done; counters stay
        return self.model.to(self._home)

    # -- hooks ------------------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        self._settle()  # the last step's leftovers, if it raised part-way, are not this step's
        self._open = True
        self._t0 = time.perf_counter()  # the step's time includes token-ahead prediction
        ids = kwargs.get("input_ids", args[0] if args else None)
        # (B, S) ids: B sequences, S tokens each (decode: S = 1); drivers predict for every sequence
        self._drive = self.driver is not None and ids is not None and ids.dim() == 2
        embeds = kwargs.get("inputs_embeds")  # a prompt given as (B, S, hidden) embeddings: no ids to predict from
        shape = tuple(ids.shape) if ids is not None else tuple(embeds.shape[:2]) if isinstance(embeds, torch.Tensor) else None
        past = kwargs.get("past_key_values")
        new = past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0)
        if new:  # new sequences: the driver forgets the last ones even when it cannot predict this step
            self.cache.new_sequence()
            if self.driver is not None:
                self.driver.reset()
        self._decode = shape is not None and shape[-1] == 1 and not new  # a one-token prompt is a prefill
        mask = kwargs.get("attention_mask")  # generate()'s (B, past + S) mask: 0 = left padding
        padding = None  # decode steps carry none
        if shape is not None and len(shape) == 2 and shape[1] > 1 and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            padding = mask[:, -shape[1] :] == 0
        # the step's real tokens: a prompt's padding is none (SYNC POINT on CUDA, once per prompt batch)
        self._step_tokens = 0 if shape is None else int(np.prod(shape)) - (0 if padding is None else int(padding.sum()))
        if self._drive:
            self.driver.begin_step(ids, padding)

    def _routed(self, layer: int, top_k_index: torch.Tensor) -> np.ndarray | None:
        """Hand the layer's routing to the driver; returns the host copy it read (None: no driver)."""
        if self._drive:
            self.driver.routed(layer, top_k_index)
            return self.driver.routed_now[:, :, layer]  # (B, S, k): the same ids in top_k_index's order
        return None

    def _layer_done(self, layer: int) -> None:
        if self._drive:
            self.driver.layer_done(layer)

    def _post(self, module, args, kwargs, output):
        self._open = False
        try:
            if self._drive:
                self.driver.end_step()
        finally:  # the cache's step ends even when the driver's raised (a dead worker)
            self.cache.end_step()
        if self.cache.cuda:  # SYNC POINT: the step's work is done (generate reads the logits next anyway)
            torch.cuda.current_stream(self.cache.device).synchronize()
        self.cache.check_host_run()  # after the sync: every layer's wait on hybrid's pool has run
        dt = time.perf_counter() - self._t0
        c = self.cache.counters
        if self._decode:
            c.decode_tokens += self._step_tokens
            c.decode_s += dt
        else:
            c.prefill_tokens += self._step_tokens
            c.prefill_s += dt
