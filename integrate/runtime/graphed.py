"""`layer_logits` replayed from CUDA graphs: one per target layer, whose input shapes never change.

Layer-ahead prediction runs once per MoE layer per decode token: 26 small eager calls made the
predictor cost 40 ms per token on an H100, and replaying graphs cut that to 8 ms (README), so most
of it was kernel-launch overhead: a captured graph launches all of a call's kernels at once. Graphs are
captured lazily, the first time each layer is predicted, on a side stream (as torch.cuda.graphs asks),
after two warm-up calls.

A predictor with a routing memory (predictor/memory.py) reads a fixed-size ring buffer. All graphs
share one static copy of it, refreshed once per token (when the memory's `version` moves), not once
per layer. A routing bank's rows (predictor/bank.py; padded to a fixed width) are shared the same way,
refreshed when `step` hands over new ones.
"""

from __future__ import annotations

from dataclasses import replace

import torch


class GraphedLayerLogits:
    """Callable like `predictor.layer_logits(ctx, cur_experts, layer, memory, bank)` (fixed shapes per layer).

    The returned logits live in the graph's static output buffer: read them before the next call for
    the same layer.
    """

    def __init__(self, predictor):
        self.predictor = predictor
        self._graphs: dict[int, tuple] = {}  # layer -> (graph, static ctx, static cur, static out)
        self._memory = None  # the static MemoryState every graph reads
        # the memory last copied in, and its version then; holding the object (not its id) means a new
        # sequence's memory can never pass for it
        self._memory_source = None
        self._memory_version = -1
        self._bank = None  # the static BankRows every graph reads
        self._bank_source = None  # the rows last copied in (step makes new ones for every token)

    @torch.no_grad()
    def __call__(self, ctx: torch.Tensor, cur: torch.Tensor, layer: int, memory=None, bank=None) -> torch.Tensor:
        if memory is not None:
            self._refresh_memory(memory)
        if bank is not None:
            self._refresh_bank(bank)
        entry = self._graphs.get(layer)
        if entry is None or entry[1].shape != ctx.shape or entry[2].shape != cur.shape:
            entry = self._graphs[layer] = self._capture(ctx, cur, layer, memory is not None, bank is not None)
        graph, static_ctx, static_cur, out = entry
        static_ctx.copy_(ctx)
        static_cur.copy_(cur)
        graph.replay()
        return out

    def _refresh_memory(self, memory) -> None:
        if self._memory is None or self._memory.keys.shape != memory.keys.shape:
            self._memory = replace(
                memory, keys=memory.keys.clone(), values=memory.values.clone(), valid=memory.valid.clone()
            )
            self._graphs.clear()  # captured against other buffers
        elif memory is not self._memory_source or memory.version != self._memory_version:
            self._memory.keys.copy_(memory.keys)
            self._memory.values.copy_(memory.values)
            self._memory.valid.copy_(memory.valid)
        self._memory_source, self._memory_version = memory, memory.version

    def _refresh_bank(self, bank) -> None:
        if self._bank is None or self._bank.experts.shape != bank.experts.shape:
            self._bank = replace(bank, experts=bank.experts.clone(), valid=bank.valid.clone())
            self._graphs.clear()
        elif bank is not self._bank_source:
            self._bank.experts.copy_(bank.experts)
            self._bank.valid.copy_(bank.valid)
        self._bank_source = bank

    def _capture(self, ctx: torch.Tensor, cur: torch.Tensor, layer: int, with_memory: bool, with_bank: bool) -> tuple:
        static_ctx, static_cur = ctx.clone(), cur.clone()
        memory = self._memory if with_memory else None
        bank = self._bank if with_bank else None
        side = torch.cuda.Stream(ctx.device)
        side.wait_stream(torch.cuda.current_stream(ctx.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (lazy inits, cuBLAS workspaces)
                self.predictor.layer_logits(static_ctx, static_cur, layer, memory, bank)
        torch.cuda.current_stream(ctx.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.predictor.layer_logits(static_ctx, static_cur, layer, memory, bank)
        return graph, static_ctx, static_cur, out
