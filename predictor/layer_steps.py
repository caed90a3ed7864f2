"""Per-layer serving calls in a few operators, for a layer_ahead predictor whose depth head has no
attention (`depth_blocks: 0`), with the skip tables and the routing bank (no routing memory).

A layer_ahead predictor is called once per MoE layer of every decode token (integrate/runtime/
prefetch.py `LayerAhead`). At batch 1 such a call costs the number of small operators it runs, not
its arithmetic, and on a host-bound runtime that cost adds to every layer: docs/RESULTS.md finds
prefetch slower than LRU at 0.31 ms per call, and faster below about 0.1 ms. Without depth attention
every term before the head's one LayerNorm is a sum over the routing known so far (B = batch,
W = depth width, E = experts, h = lookahead):

    z_l      = P c_t + e_l + sum_{l' <= l-h} U[l', experts_l'] (+ V[l-h, experts_{l-h}], depth_last)
    logits_l = W_l LN(z_l) + b_l + Sprev[experts of token t-1]_l + sum_{l' <= l-h} S[l', experts_l']_l

(the bank adds Q vote_l to z_l and a_l vote_l + b'_l log(vote_l + eps) to the logits, its overlap score
per candidate row being the running sum s <- decay s + beta |experts_l' & row_l'|, predictor/bank.py),
so `LayerSteps` keeps, per token, what the context fixes (P c_t + e, b + the previous-token table, the
bank's candidate rows, once per token) and running sums over the routed layers (the new layer's rows
and overlaps, once per layer): 10-25 operators a call where `model.logits` runs some forty to a
hundred. The numbers are model.logits's (tests/
test_layer_steps.py checks every call of a decode against it). The summed tables are copied
from the predictor's weights at construction, each with a zero row for the padding id -1: build it
once the weights are final (serving), and anew after loading others. A routing names each expert
once per layer, as a router does (a repeated id would count twice here, once in the multi-hot). A call the running sums cannot answer (less routing than its layer reads, a routing
that does not extend the kept one) is answered by `model.logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(predictor) -> bool:
    """Whether `LayerSteps` computes this predictor's per-layer logits (else use model.logits)."""
    c = predictor.config
    return c.mode == "layer_ahead" and c.depth_blocks == 0 and set(c.contributors) <= {"skip", "bank"}


def layer_logits(predictor):
    """The per-layer call `(ctx, routed (B, 1, n, k), layer, state) -> (B, E)` that serves `predictor`:
    LayerSteps where it can, else `predictor.logits` for the one layer."""
    if supports(predictor):
        return LayerSteps(predictor)
    return lambda ctx, routed, layer, state: predictor.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0]


class LayerSteps:
    """Callable as `(ctx, routed (B, 1, n, k), layer, state) -> (B, E)`: `predictor.logits` for one layer
    of the token whose context is `ctx` (integrate/runtime/graphed.py has the same signature)."""

    def __init__(self, predictor):
        if not supports(predictor):
            c = predictor.config
            raise ValueError(f"LayerSteps needs a layer_ahead predictor with depth_blocks=0 and no contributor but "
                             f"the skip tables and the routing bank; got mode={c.mode}, depth_blocks={c.depth_blocks}, "
                             f"contributors={list(c.contributors)}")
        self.model = m = predictor
        c, head = m.config, m.head
        self.h, self.L, self.E, self.W = c.lookahead, c.num_layers, c.num_experts, c.depth_width
        skip = m.contributors["skip"] if "skip" in m.contributors else None
        with torch.no_grad():
            def padded(table):  # (L, E, C) -> (L, E + 1, C): row E (id -1 modulo E + 1) is zero
                return torch.cat([table, table.new_zeros(table.shape[0], 1, table.shape[2])], 1)

            parts = [head.cur_emb.weight] + ([skip.cur.weight] if skip is not None else [])
            self.rows = padded(torch.cat(parts, -1)).contiguous()  # (L, E + 1, W [+ L * E]): summed over layers
            self.last = padded(head.last_emb.weight) if head.last_emb is not None else None  # layer l - h alone
            # the previous token's table read as rows (L * k of them) rather than by a multi-hot product
            self.prev = padded(skip.prev.weight) if skip is not None else None
        self.skip, self.bank = skip, m.bank
        self._bank_pads = m.bank is not None and bool((m.bank.experts < 0).any())  # rows with -1: map them to E + 1
        self.beta, self.decay = float(c.bank_beta), float(c.bank_decay)
        self._ctx = None  # the token whose sums are kept (held, so its identity stays unique)

    @torch.no_grad()
    def __call__(self, ctx, routed: torch.Tensor, layer: int, state) -> torch.Tensor:
        need = max(0, layer + 1 - self.h)  # the target reads the token's layers < need
        if routed.shape[1] != 1 or routed.shape[2] < need:
            return self.model.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0]
        if self._ctx is not ctx:
            self._start(ctx, state)
        used = routed[:, 0, :need]  # (B, need, k)
        m = self._routed.shape[1]
        if need < m or not torch.equal(self._routed, used[:, :m]):
            return self.model.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0]
        if need > m:  # the newly routed layers' rows, into the running sums
            new = used[:, m:] % (self.E + 1)  # (B, j, k); -1 -> the zero row
            lay = torch.arange(m, need, device=new.device)[None, :, None]
            self._sums += self.rows[lay, new].sum((1, 2))  # (B, W [+ L * E])
            if self.bank is not None:
                for j in range(m, need):
                    self._overlap(j, used[:, j])
            self._routed = used
        W, head = self.W, self.model.head
        z = self._base[:, layer]  # (B, W)
        if self.bank is not None:
            vote = self._vote(layer)  # (B, E)
            z = z + vote @ self.bank.proj.weight.T
        if need:
            z = z + self._sums[:, :W]
            if self.last is not None:
                z = z + self.last[need - 1, used[:, need - 1] % (self.E + 1)].sum(1)
        z = F.layer_norm(z, (W,), head.ln.weight, head.ln.bias, head.ln.eps)
        out = torch.addmm(self._bias[:, layer], z, head.w[layer])  # (B, E)
        if self.skip is not None and need:
            out = out + self._sums[:, W + layer * self.E : W + (layer + 1) * self.E]
        if self.bank is not None:
            out = out + self.bank.readout(vote, slice(layer, layer + 1))
        return out

    def _start(self, ctx, state) -> None:
        """A new token: the parts its context fixes, and empty running sums."""
        head, B = self.model.head, ctx.token_ids.shape[0]
        self._ctx, self._state = ctx, state
        self._base = head.ctx_proj(ctx.h[:, 0])[:, None] + head.layer_emb  # (B, L, W)
        bias = head.b.expand(B, -1, -1)  # (B, L, E)
        if self.skip is not None:  # the previous token's table, as SkipTables.logits reads it
            lay = torch.arange(self.L, device=bias.device)[None, :, None]
            rows = (lay * (self.E + 1) + ctx.prev[:, 0] % (self.E + 1)).flatten(1)  # (B, L * k) rows of the table
            bias = bias + F.embedding_bag(rows, self.prev.flatten(0, 1), mode="sum").unflatten(-1, (self.L, self.E))
        self._bias = bias.contiguous()
        self._sums = self.rows.new_zeros(B, self.rows.shape[-1])
        self._routed = ctx.prev.new_empty(B, 0, ctx.prev.shape[-1])
        if self.bank is not None:
            self._start_bank(ctx)

    # ---------------------------------------------------------------- the routing bank

    def _start_bank(self, ctx) -> None:
        """The token's candidate rows, as RoutingBank's serving path picks them: the bank's rows of its id
        and, with `recent`, the ring's earlier tokens of the same id at most `recent` back. Stored per
        layer (L, B, R, k), padding ids -1 -> E + 1 (a query never sets that column)."""
        bank, ids = self.bank, ctx.token_ids[:, 0]
        one = len(ids) == 1 and not ids.is_cuda  # (on CUDA the reads below would each wait for the device)
        rows = bank.rows_of(int(ids[0]))[None] if one else None  # (1, M, L, k), no copy
        if rows is not None and rows.shape[1]:  # one sequence: its rows are a slice of the bank
            parts = [rows % (self.E + 2) if self._bank_pads else rows]
            allowed = [torch.ones(1, rows.shape[1], dtype=torch.bool)]
        else:
            rows, valid = bank.lookup(ids)  # (B, M, L, k), (B, M)
            parts, allowed = [rows % (self.E + 2)], [valid]  # padding -1 -> E + 1
        if bank.recent:
            ring = self._state.parts.get("bank") if self._state is not None else None
            recent, near = bank.recent_candidates(ctx, ring)  # (B, R + 1, L, k), (B, 1, R + 1)
            near = near[:, 0]
            if one:  # only the rows it may read (the others' weight is 0)
                keep = near[0].nonzero()[:, 0]
                recent, near = recent[:, keep], near[:, keep]
            parts.append(recent % (self.E + 2))
            allowed.append(near)
        allowed = torch.cat(allowed, 1)
        # a frequent token has thousands of rows: one copy of each part, from the bank's int16, to (L, B, R, k) long
        self._rows = torch.empty((self.L, len(ids), allowed.shape[1], parts[0].shape[-1]), dtype=torch.long,
                                 device=allowed.device)
        at = 0
        for part in parts:
            self._rows[:, :, at : at + part.shape[1]].copy_(part.permute(2, 0, 1, 3))
            at += part.shape[1]
        self._mask = torch.where(allowed, 0.0, float("-inf"))  # (B, R)
        self._score = self._mask.new_zeros(self._mask.shape)  # (B, R): sum over routed l' of beta decay^(..) overlap

    def _overlap(self, j: int, experts: torch.Tensor) -> None:
        """Fold routed layer j's overlaps (its experts (B, k)) into the rows' scores (layers < j are in)."""
        B, R, k = self._rows.shape[1:]
        q = self._score.new_zeros(B, self.E + 2).scatter_(1, experts % (self.E + 1), 1.0)
        q[:, self.E] = 0.0  # the query's padding (-1) matches nothing
        overlap = q.gather(1, self._rows[j].view(B, R * k)).view(B, R, k).sum(-1)
        self._score.mul_(self.decay).add_(overlap, alpha=self.beta)

    def _vote(self, layer: int) -> torch.Tensor:
        """(B, E): the softmax over the candidate rows of their scores, as a vote for layer `layer`."""
        B, R, k = self._rows.shape[1:]
        w = torch.softmax(self._score + self._mask, -1).nan_to_num_(0.0)  # no candidate row: no vote
        vote = w.new_zeros(B, self.E + 2).scatter_add_(1, self._rows[layer].view(B, R * k),
                                                      w[:, :, None].expand(B, R, k).reshape(B, R * k))
        return vote[:, : self.E].to(self.bank.gain_lin.dtype)
