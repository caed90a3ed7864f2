"""Per-layer predictor calls replayed from CUDA graphs: one per target layer, whose shapes never change.

Layer-ahead prediction runs once per MoE layer per decode token; as small eager calls most of its
cost is kernel-launch overhead, and a captured graph launches all of a call's kernels at once
(docs/RESULTS.md has the H100 figures). Graphs are captured lazily, the first time each layer is
predicted, on a side stream (as torch.cuda.graphs asks), after two warm-up calls.

Every graph reads one static Context and one static copy of the serving state's contributor parts
(the routing memory's ring, the bank's ring of recent tokens). They are refreshed once per token,
when the state's `version` moves (or another state arrives), not once per layer. Everything else a
call needs (the routing bank's rows, padded to a fixed width on CUDA) is computed inside the graph.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

import torch

from predictor.state import Context


def _clone(part):
    """A copy of a contributor's state with its own tensors (None stays None)."""
    if part is None or not is_dataclass(part):
        return part
    return replace(part, **{f.name: getattr(part, f.name).clone() for f in fields(part)
                            if isinstance(getattr(part, f.name), torch.Tensor)})


def _copy_into(static, part) -> bool:
    """Copy `part`'s tensors into `static`'s; False if their shapes differ (capture again)."""
    if part is None or not is_dataclass(part):
        return static is part
    for f in fields(part):
        src, dst = getattr(part, f.name), getattr(static, f.name)
        if isinstance(src, torch.Tensor):
            if src.shape != dst.shape:
                return False
            dst.copy_(src)
    return True


class GraphedLayerLogits:
    """Callable as `(ctx, routed (B, 1, n, k), layer, state) -> (B, E)`, i.e. `predictor.logits` for one
    layer (a new batch size captures the graphs again). The returned logits live in the graph's static output buffer: read them before the next call
    for the same layer."""

    def __init__(self, predictor, capture: bool = True):
        self.predictor = predictor
        self.capture = capture  # False: run eagerly on the static copies (checks the refresh on CPU)
        self._graphs: dict[int, tuple] = {}  # layer -> (graph, static routed, static out)
        self._ctx: Context | None = None  # the static context every graph reads
        self._state = None  # a shallow copy of the serving state whose parts every graph reads
        self._source = None  # (state, version) last copied in; the object itself, so a new one never passes for it

    @torch.no_grad()
    def __call__(self, ctx: Context, routed: torch.Tensor, layer: int, state) -> torch.Tensor:
        if self._source is None or self._source[0] is not state or self._source[1] != state.version:
            self._refresh(ctx, state)
        entry = self._graphs.get(layer)
        if entry is None or entry[1].shape != routed.shape:
            entry = self._graphs[layer] = self._capture(routed, layer)
        graph, static_routed, out = entry
        static_routed.copy_(routed)
        if graph is None:
            return self._logits(static_routed, layer)
        graph.replay()
        return out

    def _refresh(self, ctx: Context, state) -> None:
        same = self._ctx is not None and all(
            getattr(self._ctx, n).shape == getattr(ctx, n).shape for n in ("h", "token_ids", "prev", "positions")
        ) and all(_copy_into(self._state.parts[k], p) for k, p in state.parts.items())
        if same:
            for name in ("h", "token_ids", "prev", "positions"):
                getattr(self._ctx, name).copy_(getattr(ctx, name))
        else:
            self._ctx = Context(ctx.h.clone(), ctx.token_ids.clone(), ctx.prev.clone(), ctx.positions.clone(),
                                served=True)
            self._state = replace(state, parts={k: _clone(p) for k, p in state.parts.items()})
            self._graphs.clear()  # captured against other buffers
        self._source = (state, state.version)

    def _logits(self, routed: torch.Tensor, layer: int) -> torch.Tensor:
        self._ctx.memo.clear()  # nothing computed outside a graph may stand in for its work
        out = self.predictor.logits(self._ctx, routed, slice(layer, layer + 1), self._state)[:, 0, 0]
        self._ctx.memo.clear()
        return out

    def _capture(self, routed: torch.Tensor, layer: int) -> tuple:
        static_routed = routed.clone()
        if not self.capture:
            return None, static_routed, None
        device = routed.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (lazy inits, cuBLAS workspaces)
                self._logits(static_routed, layer)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._logits(static_routed, layer)
        return graph, static_routed, out
