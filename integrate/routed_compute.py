"""The routed computation of an MoE layer's experts, replicated exactly from weights handed out at run
time (a mixin of every adapter in integrate/adapters.py).

`routed_forward` recomputes the experts' output one expert at a time from tensors handed out by a
`fetch(e)` callback; `routed_pool_forward` computes every routed expert at once with one grouped call
per matrix over a pool of slots, and `routed_pool_batched` runs transformers' batched_mm over it. Each
uses the same floating-point operations in the same order as the implementation the model dispatches to
(`config._experts_implementation`: "eager", "grouped_mm" or "batched_mm"), which makes their output
bitwise identical to the unpatched model's. An architecture overrides only
its per-expert math (`_eager_up`, `_grouped_up`, `_pool_up`, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import (
    _grouped_mm,  # the dispatcher the model's grouped_mm path calls
    batched_mm_experts_forward,  # the model's batched_mm path itself
)

from integrate.grouping import MAX_GROUPS, WINDOWS_FROM, Window, pool_windows, span_window  # noqa: F401  (re-exported)

Fetch = Callable[[int], dict[str, torch.Tensor]]
def _one_group_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ w [in, out] through the grouped-GEMM dispatcher grouped_mm_experts_forward uses.

    Same kernel, so the same rounding: on CUDA, cuBLAS picks other algorithms than the grouped
    kernel for small n (GPT-OSS-sized bf16 experts differed by 1 ulp through torch.mm).
    """
    offs = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
    return _grouped_mm(x, w.unsqueeze(0), offs=offs)


class _SlotView:
    """An experts module whose weight tensors are a slot pool's views (name -> (S, *shape)); every other
    attribute (gate, activation, flags) is the module's own."""

    def __init__(self, experts: nn.Module, pool: dict[str, torch.Tensor]):
        self.__dict__.update(_experts=experts, _pool=pool)

    def __getattr__(self, name: str):
        pool = self.__dict__["_pool"]
        return pool[name] if name in pool else getattr(self.__dict__["_experts"], name)


def _to_weights(x: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.device]:
    """x moved to where the expert's weights are (the host, for a miss a hybrid runtime computes
    there), and the device its result goes back to."""
    device = next(iter(t.values())).device
    return (x if x.device == device else x.to(device)), x.device


def experts_implementation(experts: nn.Module) -> str:
    # `@use_experts_implementation` dispatches on config._experts_implementation; None falls back
    # to the class's own (eager) forward
    config = getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None) or "eager"


class RoutedCompute:
    # CPU elementwise kernels vectorise a flattened tensor and finish its tail with scalar code, so
    # a gate whose intermediates are contiguous [N, I] tensors rounds differently at different N.
    # `chunk(2)` views keep the default gate row by row; GPT-OSS's interleaved gate is not, so its
    # grouped replica gates a buffer of the same [N*k, 2I] shape as grouped_mm does.
    row_local_gate = True
    architecture = ""

    # per-expert math, written exactly as each implementation writes it
    def _eager_up(self, x, t):
        return F.linear(x, t["gate_up_proj"])

    def _eager_down(self, h, t):
        return F.linear(h, t["down_proj"])

    def _grouped_up(self, x, t):  # grouped_mm is handed the weight as (in, out)
        return _one_group_mm(x, t["gate_up_proj"].transpose(-2, -1))

    def _grouped_down(self, h, t):
        return _one_group_mm(h, t["down_proj"].transpose(-2, -1))

    # ---- the routed computation, one expert at a time ----------------------------------------
    def routed_forward(
        self,
        experts: nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        fetch: Fetch,
    ) -> torch.Tensor:
        """`experts.forward(hidden, top_k_index, top_k_weights)` with weights from `fetch(e)`.

        fetch is called once per routed expert, in ascending id order, and its tensors are used
        before the next call (so a runtime may recycle the buffer it handed out).
        """
        impl = experts_implementation(experts)
        if impl == "eager":
            return self._eager_forward(experts, hidden, top_k_index, top_k_weights, fetch)
        if impl == "grouped_mm":
            return self._grouped_forward(experts, hidden, top_k_index, top_k_weights, fetch)
        hint = ("batched_mm runs over a slot pool only (routed_pool_batched): every routed expert of the layer at once"
                if impl == "batched_mm" else "call model.set_experts_implementation('grouped_mm') first")
        raise NotImplementedError(
            f"{self.architecture}: routed_forward replicates experts_implementation 'eager' and "
            f"'grouped_mm', not {impl!r}; {hint}"
        )

    def _eager_forward(self, experts, hidden, top_k_index, top_k_weights, fetch):
        # mirrors *Experts.forward: per expert in ascending id, tokens ordered by (slot, token),
        # accumulated with index_add_ in expert order
        final = torch.zeros_like(hidden)
        slot_major = top_k_index.transpose(0, 1)  # [k, N], the layout of expert_mask[e]
        for e in torch.unique(top_k_index).tolist():
            top_k_pos, token_idx = torch.where(slot_major == e)
            t = fetch(e)
            x, home = _to_weights(hidden[token_idx], t)  # a hybrid runtime may hand out host weights
            h = self._eager_up(x, t)
            h = experts._apply_gate(h)
            h = self._eager_down(h, t).to(home)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final

    def _grouped_forward(self, experts, hidden, top_k_index, top_k_weights, fetch):
        # mirrors integrations.moe.grouped_mm_experts_forward: (token, slot) pairs sorted by
        # expert, one matmul per expert group, outputs summed over the k slots of each token
        num_tokens, k = top_k_index.shape
        flat_weights = top_k_weights.reshape(-1)
        expert_sorted, perm = torch.sort(top_k_index.reshape(-1))
        counts = torch.bincount(expert_sorted, minlength=int(experts.num_experts)).tolist()
        weighted = scratch = None
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = perm[start : start + n]
            t = fetch(e)
            x, home = _to_weights(hidden[rows // k], t)  # a hybrid runtime may hand out host weights
            h = self._grouped_up(x, t)
            if self.row_local_gate:
                h = experts._apply_gate(h)
            else:
                if home != h.device:
                    raise NotImplementedError(f"{self.architecture}: hybrid execution on another device than the model's")
                if scratch is None:
                    scratch = h.new_zeros((num_tokens * k, h.shape[-1]))
                scratch[start : start + n] = h
                h = experts._apply_gate(scratch)[start : start + n]
            start += n
            h = self._grouped_down(h, t).to(home)
            h = h * flat_weights[rows].unsqueeze(-1)
            if weighted is None:
                weighted = h.new_zeros((num_tokens * k, h.shape[-1]))
            weighted[rows] = h
        if weighted is None:  # no tokens
            return torch.zeros_like(hidden)
        return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden.dtype)


    # ---- the routed computation, every expert at once over a pool of slots --------------------
    def _pool_up(self, x, pool, offs):  # pool tensors are (slots, *one expert's shape)
        return _grouped_mm(x, pool["gate_up_proj"].transpose(-2, -1), offs=offs)

    def _pool_down(self, h, pool, offs):
        return _grouped_mm(h, pool["down_proj"].transpose(-2, -1), offs=offs)

    def routed_pool_forward(self, experts, hidden, top_k_index, top_k_weights, slot_of, pool, windows=None):
        """grouped_mm's `experts.forward` in one grouped call per matrix over a slot pool: `pool` maps
        each tensor name to (S, *shape) views of S slots, `slot_of` (E,) long gives each routed expert's
        slot; `windows` (`pool_windows`, host ints) splits the pool into several grouped calls over the
        used slots only (None: one call over all S). Bitwise equal to grouped_mm: rows are grouped by
        slot only for the GEMMs (a row's GEMM result does not depend on where it sits or which call
        computes it); the gate and the weighting run in grouped_mm's own expert-sorted row order, as CPU
        elementwise kernels split by position across threads."""
        weighted = self.routed_pool_pairs(experts, hidden, top_k_index, top_k_weights, slot_of, pool, windows)
        return weighted.sum(dim=1).to(hidden.dtype)

    def routed_pool_batched(self, experts, hidden, top_k_index, top_k_weights, slot_of, pool):
        """batched_mm's `experts.forward` over a slot pool: transformers' own function, its weights gathered
        by slot (`slot_of[top_k_index]`) from the pool's views instead of by expert from the module's. The
        gathered values are the experts' own, so the output is batched_mm's to the bit."""
        if getattr(experts, "_is_expert_parallel", False):  # its id clamp would pick slots by expert count
            raise NotImplementedError(f"{self.architecture}: batched_mm over a slot pool with expert parallelism")
        return batched_mm_experts_forward(_SlotView(experts, pool), hidden, slot_of[top_k_index], top_k_weights)

    def routed_pool_pairs(
        self, experts, hidden, top_k_index, top_k_weights, slot_of, pool, windows=None, pairs=None, ordered=False
    ):
        """`routed_pool_forward` before its sum over the k picks: (T, k, H) weighted expert outputs. `pairs`
        (n,) long, flat token * k + pick positions: compute only those, the others stay 0, so two parts
        computed apart (hybrid: the device's slots and the host's store) add up, before the sum, to one
        call's terms (the gate then sees only its part's rows: within rounding where it is not row-local).
        `ordered`: the caller knows the routed experts' slots rise with their ids, so expert order is
        slot order and the rows need no second sort."""
        num_tokens, k = top_k_index.shape
        flat_weights = top_k_weights.reshape(-1)
        if pairs is None:
            expert_sorted, perm = torch.sort(top_k_index.reshape(-1))  # grouped_mm's order
        else:
            expert_sorted, order = torch.sort(top_k_index.reshape(-1)[pairs])
            perm = pairs[order]
        if ordered:
            plan = self._pool_plan(pool, slot_of[expert_sorted], windows)
            up = self._pool_windows(self._pool_up, hidden[perm // k], plan)
            h = self._pool_windows(self._pool_down, experts._apply_gate(up), plan)
        else:
            slots, by_slot = torch.sort(slot_of[expert_sorted], stable=True)  # the pool's order, for the GEMMs
            plan = self._pool_plan(pool, slots, windows)
            up = self._pool_windows(self._pool_up, hidden[perm[by_slot] // k], plan)
            h = torch.empty_like(up)
            h[by_slot] = up
            h = experts._apply_gate(h)
            down = self._pool_windows(self._pool_down, h[by_slot], plan)
            h = torch.empty_like(down)
            h[by_slot] = down
        h = h * flat_weights[perm].unsqueeze(-1)
        weighted = h.new_zeros((num_tokens * k, h.shape[-1]))
        weighted[perm] = h
        return weighted.view(num_tokens, k, -1)

    @staticmethod
    def _pool_plan(pool, slots, windows: list[Window] | None) -> list[tuple]:
        """The grouped calls over a pool, made once for both matrices: per window (rows r0:r1, the window's
        pool views, group offsets of its rows' slots); None: one call over the whole pool."""
        if windows is None:
            offs = torch.bincount(slots, minlength=len(next(iter(pool.values())))).cumsum(0, dtype=torch.int32)
            return [(None, None, pool, offs)]
        return [(r0, r1, {n: v[lo:hi] for n, v in pool.items()},
                 torch.bincount(slots[r0:r1] - lo, minlength=hi - lo).cumsum(0, dtype=torch.int32))
                for lo, hi, r0, r1 in windows]  # fmt: skip

    @staticmethod
    def _pool_windows(gemm, x, plan: list[tuple]) -> torch.Tensor:
        """`gemm` (x rows in slot order, pool views, offs) over each call of a `_pool_plan`, rows concatenated."""
        out = [gemm(x if r0 is None else x[r0:r1], views, offs) for r0, r1, views, offs in plan]
        return out[0] if len(out) == 1 else torch.cat(out)
