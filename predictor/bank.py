"""Routing bank: how the same token routed across the training set, weighted by how much that
routing agrees with the current token's so far (a nearest-neighbour vote kept inside the predictor).

Why: the context vector cannot remember, for every token id, how that token's routing at layer l
follows from its routing at the layers before; the training set can (docs/RESULTS.md).

For token t with id v, at MoE layer l (layer_ahead, lookahead h), over the candidate rows r:

    s[r, l]   = sum_{l' <= l-h} decay^(l-h-l') |experts[t, l'] & row[r, l']|       (0 for l < h)
    w[r, l]   = softmax_r(beta * s[r, l])
    vote[l]   = sum_r w[r, l] * multi-hot(row[r, l])                                (E,); zeros: no rows
    logits[l] += a_l * vote[l] + b_l * log(vote[l] + eps);   the depth input at l gets  P vote[l]

The candidate rows are the bank's rows of id v (not those of the token's own prompt while training
on the split the bank holds) and, with `recent` > 0, the prompt's own earlier tokens of id v at most
`recent` positions back (their routing is known once they are routed). beta and decay are fixed, so
the vote needs no gradient: only a, b and P learn.

One formula (`softmax_vote`) over groups of queries sharing candidate rows; the rows are assembled in
one of two ways for the same result (checked by tests/test_bank.py's cache == no-cache test):
* whole sequences (no state): the bank's rows per distinct token id, from a float multi-hot of the
  bank built on first use; votes of training prompts are memoised by (prompt, position), since they
  have no learned parameter (`_SequenceVotes`), up to `memo_bytes` (MEMO_BYTES = 2 GiB by default,
  about 3.7 KB per token for DeepSeek-V2-Lite: 570 k tokens; Puffin's train split takes 0.6 GB). Once
  the memo is full, further votes are computed every time they are asked for, not stored (each costs
  what the first epoch pays, about a quarter of a CPU training step); what is stored stays valid;
* serving (a state): each token's rows gathered from the int16 store, on CUDA padded to the most
  frequent token's count so shapes never change (CUDA graphs).
The prompt's own rows come from the call's earlier tokens and, when serving, a ring buffer of the last
`recent` routed tokens (`RecentRing`); their part merges with the bank's through the softmax normalisers.

Storage, grouped by token id (CSR): `offsets` (V+1,), `experts` (N, L, k) int16, `sequences` (N,)
(the prompt id of each row); the buffers take the size of what `fill` or a state dict gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .bank_votes import (  # noqa: F401  (softmax_vote, merge_votes: imported from here too)
    NEG_INF,
    _SequenceVotes,
    layer_overlap,
    merge_votes,
    softmax_vote,
    vote_from_overlap,
)
from .contributors import Contributor
from .embeddings import expert_multi_hot
from .state import Context, Routed, extends

EPS = 0.02  # floor inside log(vote + eps), as in the routing memory
MEMO_BYTES = 2 << 30  # default cap of the memoised votes (RoutingBank(memo_bytes=...))


def build_bank(
    token_ids: np.ndarray, experts: np.ndarray, sequences: np.ndarray, vocab_size: int, size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by token id, at most `size` per token (a seeded random subset of its occurrences).

    token_ids (N,), experts (N, L, k), sequences (N,) -> offsets (V+1,) int64, experts (N', L, k) int16,
    sequences (N',) int64."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
        raise ValueError(f"bank: token ids must lie in [0, vocab_size={vocab_size})")
    if experts.shape[0] != token_ids.shape[0] or np.shape(sequences) != token_ids.shape:
        raise ValueError(
            f"bank: token_ids {token_ids.shape}, experts {experts.shape} and sequences "
            f"{np.shape(sequences)} must have the same number of rows"
        )
    rng = np.random.default_rng(seed)
    order = np.argsort(token_ids, kind="stable")
    counts = np.bincount(token_ids, minlength=vocab_size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    keep = []
    for v in np.nonzero(counts)[0]:
        rows = order[starts[v] : starts[v] + counts[v]]
        keep.append(np.sort(rng.choice(rows, size, replace=False)) if len(rows) > size else rows)
    keep = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.minimum(counts, size))]).astype(np.int64)
    return offsets, experts[keep].astype(np.int16), np.asarray(sequences, dtype=np.int64)[keep]


@dataclass
class RecentRing:
    """Serving: the prompt's last R routed tokens (fixed shapes): ids (B, R) (-1 = empty),
    experts (B, R, L, k), positions (B, R); `written` counts appends."""

    ids: torch.Tensor
    experts: torch.Tensor
    positions: torch.Tensor
    written: int = 0


class RoutingBank(Contributor):
    def __init__(self, vocab_size: int, num_layers: int, num_experts: int, top_k: int, lookahead: int,
                 beta: float, decay: float, d_out: int, size: int = 0, recent: int = 0, memo_bytes: int = MEMO_BYTES):
        super().__init__()
        L, E = num_layers, num_experts
        self.V, self.L, self.E, self.k = vocab_size, L, E, top_k
        self.size, self.recent, self.h = size, recent, lookahead
        if memo_bytes < 0:
            raise ValueError(f"bank: memo_bytes must be >= 0 (0: no memo), got {memo_bytes}")
        self.memo_bytes = memo_bytes  # cap of the training memo (`_memoised`); votes past it are recomputed
        self.register_buffer("offsets", torch.zeros(vocab_size + 1, dtype=torch.long))
        self.register_buffer("experts", torch.zeros(0, L, top_k, dtype=torch.int16))
        self.register_buffer("sequences", torch.zeros(0, dtype=torch.long))
        src, tgt = torch.arange(L)[:, None], torch.arange(L)[None, :]
        gap = (tgt - lookahead - src).float()  # (L_src, L_tgt): layers between source l' and l - h
        self.register_buffer("beta_decay", torch.where(gap >= 0, beta * decay**gap, 0.0), persistent=False)
        self.gain_lin = nn.Parameter(torch.zeros(L))
        self.gain_log = nn.Parameter(torch.zeros(L))
        self.proj = nn.Linear(E, d_out, bias=False)  # vote -> depth transformer input
        self._cache: dict = {}  # derived from the buffers: reset by fill() and by loading a state dict

    # ------------------------------------------------------------------ contents

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("experts", "sequences", "offsets"):  # the buffers take the stored sizes
            stored = state_dict.get(prefix + name)
            current = getattr(self, name)
            if stored is not None and stored.shape != current.shape:
                setattr(self, name, current.new_empty(stored.shape))
        self._cache.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fill(self, offsets: np.ndarray, experts: np.ndarray, sequences: np.ndarray) -> None:
        """Hold the arrays of `build_bank` (any number of rows; offsets must cover the vocabulary)."""
        if offsets.shape != (self.V + 1,):
            raise ValueError(f"bank: offsets must have shape ({self.V + 1},) for vocab_size {self.V}, got {offsets.shape}")
        dev = self.offsets.device
        self.offsets = torch.as_tensor(offsets, dtype=torch.long, device=dev)
        self.experts = torch.as_tensor(np.asarray(experts), dtype=torch.int16, device=dev).reshape(-1, self.L, self.k)
        self.sequences = torch.as_tensor(np.asarray(sequences), dtype=torch.long, device=dev)
        self._cache.clear()

    def fill_from_rows(self, token_ids: np.ndarray, experts: np.ndarray, sequences: np.ndarray, seed: int = 0):
        """Build from every token of a split (token ids (N,), experts (N, L, k), prompt ids (N,))."""
        self.fill(*build_bank(token_ids, experts, sequences, self.V, self.size, seed=seed))
        return self

    @property
    def rows(self) -> int:
        return self.experts.shape[0]

    @property
    def width(self) -> int:
        """Rows of the most frequent token (serving on CUDA pads every token's rows to it)."""
        if "width" not in self._cache:
            self._cache["width"] = max(1, int((self.offsets[1:] - self.offsets[:-1]).max()))
        return self._cache["width"]

    def readout(self, vote: torch.Tensor, layers: slice) -> torch.Tensor:
        """vote (..., n', E) -> (..., n', E) logits for `layers`."""
        a, b = self.gain_lin[layers, None], self.gain_log[layers, None]
        return a * vote + b * torch.log(vote + EPS)

    # ------------------------------------------------------------------ contributor

    def depth_input(self, ctx: Context, routed: torch.Tensor, stop: int, part) -> torch.Tensor:
        return self.proj(self.votes(ctx, routed, stop, part))

    def logits(self, ctx: Context, routed: torch.Tensor, layers: slice, part) -> torch.Tensor:
        return self.readout(self.votes(ctx, routed, layers.stop, part)[..., layers, :], layers)

    def init_state(self, batch_size: int, device) -> RecentRing | None:
        if not self.recent:
            return None
        R = self.recent
        return RecentRing(
            ids=torch.full((batch_size, R), -1, dtype=torch.long, device=device),
            experts=torch.full((batch_size, R, self.L, self.k), -1, dtype=torch.long, device=device),
            positions=torch.full((batch_size, R), -(2**40), dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def append(self, ring: RecentRing | None, routed: Routed) -> None:
        if ring is None:
            return
        n = min(routed.token_ids.shape[1], self.recent)
        slots = (ring.written + torch.arange(n, device=ring.ids.device)) % self.recent
        ring.ids[:, slots] = routed.token_ids[:, -n:]
        ring.experts[:, slots] = routed.experts[:, -n:].long()
        ring.positions[:, slots] = routed.positions[:, -n:]
        ring.written += n

    @torch.no_grad()
    def sequence_votes(self, token_ids, experts, exclude=None, sample_positions=None) -> torch.Tensor:
        """Whole sequences without a model (baselines, research): token_ids (B, T), experts (B, T, L, k)
        -> votes (B, T, L, E), each token reading its own routing at layers <= l - h only."""
        T = token_ids.shape[1]
        prev = torch.cat([torch.full_like(experts[:, :1], -1), experts[:, :-1]], dim=1)
        positions = torch.arange(T, device=token_ids.device).expand_as(token_ids)
        ctx = Context(None, token_ids, prev, positions, exclude, sample_positions)
        return self.votes(ctx, experts[:, :, : max(0, self.L - self.h)], self.L)

    @torch.no_grad()
    def votes(self, ctx: Context, routed: torch.Tensor, stop: int, ring: RecentRing | None = None) -> torch.Tensor:
        """(B, T, stop, E): each token's vote at layers [0, stop), over the bank's rows and (recent > 0)
        the prompt's own earlier tokens. Memoised per call in `ctx.memo` (depth input and logits share it)."""
        if ctx.served:
            return self._served_votes(ctx, routed, stop, ring)
        key = ("bank", stop)
        if key not in ctx.memo:
            q_hot = expert_multi_hot(routed, self.E, torch.float32)  # (B, T, n, E)
            parts = [self._sequence_part(ctx, routed, q_hot, stop)]
            if self.recent:
                parts.append(self._recent_part(ctx, q_hot, stop, ring))
            ctx.memo[key] = merge_votes(parts).to(self.gain_lin.dtype)
        return ctx.memo[key]

    def _served_votes(self, ctx: Context, routed: torch.Tensor, stop: int, ring: RecentRing | None) -> torch.Tensor:
        """Serving, incrementally over one call's per-layer predictions: the vote at layer l reads only
        the routing at layers <= l - h, so once the call knows those layers it is final and stays valid
        while the known routing grows; each call adds the overlaps of its newly routed layers and the
        votes of its new target layers. Kept in `ctx.memo`: the final votes only (a caller may pass less
        routing than a target needs: those votes are returned, not kept); a routing that does not
        extend the kept one starts over."""
        inc = ctx.memo.get("bank_served")
        n = routed.shape[2]
        if inc is None or not extends(inc["routed"], routed):
            B, T = ctx.token_ids.shape
            inc = {"routed": routed[:, :, :0], "overlaps": None,
                   "votes": torch.zeros(B, T, 0, self.E, device=ctx.token_ids.device, dtype=self.gain_lin.dtype)}
        n0, done = inc["routed"].shape[2], inc["votes"].shape[2]
        parts = self._served_rows(ctx, ring) if stop > done or n > n0 else None
        if inc["overlaps"] is None or n > n0:  # the overlaps of the newly routed layers (none at first: 0 layers)
            q_new = expert_multi_hot(routed[:, :, n0:], self.E, torch.float32)  # (B, T, n - n0, E)
            new = [layer_overlap(to_q(q_new), rows_hot, first=n0) for rows_hot, _, to_q, _ in parts]
            inc["overlaps"] = new if inc["overlaps"] is None else [torch.cat(p, 1) for p in zip(inc["overlaps"], new)]
            inc["routed"] = routed
        votes = inc["votes"]
        if stop > done:
            fresh = [
                tuple(back(x) for x in vote_from_overlap(o, rows_hot, allowed, self.beta_decay, done, stop))
                for o, (rows_hot, allowed, _, back) in zip(inc["overlaps"], parts)
            ]
            votes = torch.cat([votes, merge_votes(fresh).to(self.gain_lin.dtype)], 2)
            inc["votes"] = votes[:, :, : max(done, min(stop, n + self.h))]  # final: layers l < n + h
        ctx.memo["bank_served"] = inc
        return votes[:, :, :stop]

    def _served_rows(self, ctx: Context, ring: RecentRing | None) -> list[tuple]:
        """The candidate row sets of a served call, each (rows_hot (G, r, L, E), allowed (G, q, r),
        queries (B, T, n, E) -> (G, q, n, E), results (G, q, ...) -> (B, T, ...)): the bank's rows of
        each token (one group per token) and, with `recent`, the ring and the call's own earlier tokens
        (one group per sequence). Built once per call (every layer reads them)."""
        if "served_rows" not in ctx.memo:
            B, T = ctx.token_ids.shape
            rows, valid = self.lookup(ctx.token_ids.reshape(-1))  # (B*T, M, L, k), (B*T, M)
            per_token = (lambda q: q.flatten(0, 1)[:, None], lambda x: x.reshape(B, T, *x.shape[2:]))
            parts = [(expert_multi_hot(rows, self.E, torch.float32), valid[:, None], *per_token)]
            if self.recent:
                rows_hot, allowed = self._recent_rows(ctx, ring)
                parts.append((rows_hot, allowed, lambda q: q, lambda x: x))
            ctx.memo["served_rows"] = parts
        return ctx.memo["served_rows"]

    def _recent_part(self, ctx: Context, q_hot, stop: int, ring: RecentRing | None):
        """The prompt's own earlier tokens of the same id, at most `recent` back: this call's tokens
        and, serving, the ring -> (vote (B, T, stop, E), lse (B, T, stop)); one group per sequence."""
        return softmax_vote(q_hot, *self._recent_rows(ctx, ring), self.beta_decay, stop)

    def _recent_rows(self, ctx: Context, ring: RecentRing | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring's and this call's tokens as rows (B, R + T, L, E) and which each query may read (B, T, R + T)."""
        rows, allowed = self.recent_candidates(ctx, ring)
        return expert_multi_hot(rows, self.E, torch.float32), allowed

    def recent_candidates(self, ctx: Context, ring: RecentRing | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring's and this call's tokens as candidate rows, expert ids (B, R + T, L, k) (-1: none), and
        which each query may read (B, T, R + T): an earlier token of the same id at most `recent` back."""
        ids, pos, rows = ctx.token_ids, ctx.positions, ctx.completed()
        if ring is not None:
            ids, pos = torch.cat([ring.ids, ids], 1), torch.cat([ring.positions, pos], 1)
            rows = torch.cat([ring.experts, rows], 1)
        dist = ctx.positions[:, :, None] - pos[:, None, :]  # (B, T, R + T)
        allowed = (ctx.token_ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)
        allowed &= (dist > 0) & (dist <= self.recent) & ctx.real[:, :, None]
        return rows, allowed

    def rows_of(self, token_id: int) -> torch.Tensor:
        """(M, L, k) the bank's rows of one token id, as stored (int16; no copy); M = 0 for none (or id -1)."""
        if token_id < 0:
            return self.experts[:0]
        return self.experts[int(self.offsets[token_id]) : int(self.offsets[token_id + 1])]

    def lookup(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids (N,) -> rows (N, M, L, k) long and valid (N, M): on CUDA M = `width` (fixed
        shapes for CUDA graphs), elsewhere the largest count among these tokens."""
        v = token_ids.clamp_min(0)
        start = self.offsets[v]
        count = torch.where(token_ids >= 0, self.offsets[v + 1] - start, 0)
        M = self.width if token_ids.is_cuda else max(1, int(count.max()))
        j = torch.arange(M, device=token_ids.device)
        valid = j < count[:, None]  # (N, M)
        idx = torch.where(valid, start[:, None] + j, 0)
        if self.rows == 0:
            return torch.full((len(v), M, self.L, self.k), -1, device=v.device), valid
        return self.experts[idx].long(), valid

    def _sequence_part(self, ctx: Context, routed, q_hot, stop: int):
        """Whole sequences: one group per distinct token id over the bank's rows of that id, memoised
        by (prompt, position) when training (`ctx.exclude` and `ctx.sample_positions`)."""
        B, T = ctx.token_ids.shape
        ids, flat, hot = ctx.token_ids.reshape(-1), routed.reshape(B * T, *routed.shape[2:]), q_hot.flatten(0, 1)
        exclude = None if ctx.exclude is None else ctx.exclude[:, None].expand(B, T).reshape(-1)
        if exclude is None or ctx.sample_positions is None or stop != self.L:
            vote, lse = self._grouped(ids, hot, exclude, stop)
        else:
            vote, lse = self._memoised(ids, flat, hot, exclude, ctx.sample_positions.reshape(-1))
        return vote.view(B, T, stop, self.E), lse.view(B, T, stop)

    def _grouped(self, ids, hot, exclude, stop: int):
        """ids (N,), hot (N, n, E), exclude (N,) or None -> (vote (N, stop, E), lse (N, stop))."""
        bank_hot, offsets = self._bank_hot()
        out = hot.new_zeros(len(ids), stop, self.E)
        lse = hot.new_full((len(ids), stop), NEG_INF)
        host_ids = ids.cpu().numpy()
        order = np.argsort(host_ids, kind="stable")
        uniq, first = np.unique(host_ids[order], return_index=True)
        bounds = np.append(first, len(ids))
        for i, v in enumerate(uniq):
            a, b = (offsets[v], offsets[v + 1]) if v >= 0 else (0, 0)
            if a == b:  # padding, or a token the bank never saw: zero vote
                continue
            q = torch.from_numpy(order[bounds[i] : bounds[i + 1]]).to(hot.device)
            allowed = torch.ones(1, len(q), b - a, dtype=torch.bool, device=hot.device)
            if exclude is not None:
                allowed = (self.sequences[None, a:b] != exclude[q][:, None])[None]
            vote, part_lse = softmax_vote(hot[q][None], bank_hot[None, a:b], allowed, self.beta_decay, stop)
            out[q], lse[q] = vote[0], part_lse[0]
        return out, lse

    def _bank_hot(self) -> tuple[torch.Tensor, np.ndarray]:
        hot = self._cache.get("hot")
        if hot is None or hot.device != self.experts.device:
            self._cache["hot"] = expert_multi_hot(self.experts.long(), self.E, torch.float32)  # (N, L, E)
            self._cache["offsets"] = self.offsets.cpu().numpy()
        return self._cache["hot"], self._cache["offsets"]

    @property
    def memo_used(self) -> int:
        """Bytes the memoised votes take (at most `memo_bytes`)."""
        return self._cache.get("memo_used", 0)

    def _memoised(self, ids, routed, hot, sequences, positions):
        """As `_grouped` over all L layers, reading back (and storing) votes by (prompt, position).
        A memo entry is used only when its token id and routing equal the query's; votes are rounded to
        float16 whether computed or read back, so both agree. New entries are stored while the memo stays
        within `memo_bytes`; past that they are computed and not kept."""
        memo: dict[int, _SequenceVotes] = self._cache.setdefault("memo", {})
        dev = ids.device
        out = torch.zeros(len(ids), self.L, self.E, dtype=torch.float16, device=dev)
        lse = torch.full((len(ids), self.L), NEG_INF, device=dev)
        real = (ids >= 0) & (positions >= 0)  # padding keeps a zero vote and is not stored
        todo = real.clone()
        groups = {s: torch.nonzero(real & (sequences == s)).squeeze(1) for s in torch.unique(sequences[real]).tolist()}
        for s, idx in groups.items():
            if s in memo:
                hit = idx[memo[s].match(positions[idx], ids[idx], routed[idx])]
                out[hit], lse[hit] = memo[s].votes[positions[hit]], memo[s].lse[positions[hit]]
                todo[hit] = False
        if bool(todo.any()):
            vote, new_lse = self._grouped(ids[todo], hot[todo], sequences[todo], self.L)
            out[todo], lse[todo] = vote.to(torch.float16), new_lse
            per_position = _SequenceVotes.position_bytes(self.L, self.E, tuple(routed.shape[1:]))
            for s, idx in groups.items():
                new = idx[todo[idx]]
                if not len(new):
                    continue
                grow = memo[s].growth(positions[new]) if s in memo else int(positions[new].max()) + 1
                if self.memo_used + grow * per_position > self.memo_bytes:
                    continue  # full: computed, not stored
                entry = memo.setdefault(s, _SequenceVotes(self.L, self.E, routed.shape[1:], dev))
                entry.store(positions[new], ids[new], routed[new], out[new], lse[new])
                self._cache["memo_used"] = self.memo_used + grow * per_position
        return out.float(), lse
