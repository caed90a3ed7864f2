"""Routing bank: how the same token routed across the training set, weighted by how much that
routing agrees with the current token's so far (a nearest-neighbour vote kept inside the predictor).

Why. The predictor's context vector cannot remember, for each of 15 k token ids, how that token's
routing at layer l follows from its routing at the layers before; the training set can. On the Puffin
traces (held-out, layer_ahead h=1) a hand-set vote over *all* training occurrences of the token, added
to the 71.2 % predictor's logits as 0.5 * log(vote + 0.02), gives 74.1 % recall@6; keeping only 64 or
128 random occurrences per token gives 72.7 / 72.9 % (experiments/bank_signal.py). So the bank keeps
every occurrence (up to `size` per token).

For token t with id v, at MoE layer l (layer_ahead, lookahead h), over the bank rows r of token v:

    s[r, l]   = sum_{l' <= l-h} decay^(l-h-l') |experts[t, l'] & bank[r, l']|      (0 for l < h)
    w[r, l]   = softmax_r(beta * s[r, l])
    vote[l]   = sum_r w[r, l] * multi-hot(bank[r, l])                              (E,); zeros: no rows
    logits[l] += a_l * vote[l] + b_l * log(vote[l] + eps);   the depth input at l gets  P vote[l]

beta and decay are fixed (config), so the vote needs no gradient: only a, b and P learn.

Recent rows (`recent` > 0, config `bank_recent`): the prompt's own earlier tokens t - recent <= t' < t
with the same id are rows too, in the same softmax (a bank that grows with the prompt being served;
their routing is known once they are routed). On the Puffin traces (held-out, h=1, 512 tokens back)
they lift the vote alone from 62.9 to 66.5 % recall@6, and swapping that vote into a predictor trained
without them (74.3 %), with no retraining, gives 75.2 % (experiments/vote_variants.py). In training and
evaluation they come from the window being scored (so a token early in a later window sees fewer than
`recent`); serving keeps a ring buffer of the last `recent` tokens (`RecentTokens`).

Training reads the bank built from its own split, so `exclude` drops the rows of the query's own
sequence: a token never votes for itself (or for its prompt's later tokens), and the vote is as good
in training as on a new prompt.

Storage, grouped by token id (CSR): `offsets` (V+1,), `experts` (N, L, k) int16, `sequences` (N,)
(the prompt id of each row). Two ways to compute the same vote (tests/test_bank.py checks they agree):
* `sequence_votes` / `votes` (training, evaluation: whole sequences): one batched matmul per distinct
  token over a cached float multi-hot of the bank (N x L x E floats: 1 GB for Puffin; built on first use); given positions,
  it memoises each (prompt, position)'s vote (float16, tokens x L x E x 2 bytes: 0.6 GB for Puffin's
  192 k tokens; it is not bounded, so it grows with the data), so only the first epoch pays for it
  (about a quarter of a CPU training step); the recent rows are merged in afterwards, per batch, from
  the (token, earlier same-id token) pairs of each window;
* `lookup` + `vote` (serving, one token per sequence): gathers over the int16 ids, no cache; on CUDA
  the rows are padded to the most frequent token's count, so shapes never change (CUDA graphs); the
  ring's `recent` slots follow as further rows, valid where their id is the token's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .embeddings import expert_multi_hot

EPS = 0.02  # floor inside log(vote + eps), as in the routing memory


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


class _SequenceVotes:
    """Memoised votes of one sequence, by position (grown as later positions arrive): the token id and
    routing each vote was computed for (a lookup must match both), the vote itself (float16) and the
    log of its softmax normaliser (float32; merging in the prompt's own rows needs it)."""

    def __init__(self, L: int, E: int, k: int, device: torch.device):
        self.ids = torch.full((0,), -1, dtype=torch.long, device=device)
        self.experts = torch.zeros(0, L, k, dtype=torch.int16, device=device)
        self.votes = torch.zeros(0, L, E, dtype=torch.float16, device=device)
        self.lse = torch.zeros(0, L, dtype=torch.float32, device=device)

    def match(self, positions: torch.Tensor, token_ids: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        inside = positions < len(self.ids)
        p = torch.where(inside, positions, 0)
        same = (self.ids[p] == token_ids) & (self.experts[p] == experts).flatten(1).all(1)
        return inside & same

    def store(self, positions, token_ids, experts, votes, lse) -> None:
        n = int(positions.max()) + 1
        if n > len(self.ids):
            grow = n - len(self.ids)
            self.ids = torch.cat([self.ids, self.ids.new_full((grow,), -1)])
            self.experts = torch.cat([self.experts, self.experts.new_zeros(grow, *self.experts.shape[1:])])
            self.votes = torch.cat([self.votes, self.votes.new_zeros(grow, *self.votes.shape[1:])])
            self.lse = torch.cat([self.lse, self.lse.new_zeros(grow, *self.lse.shape[1:])])
        self.ids[positions], self.experts[positions] = token_ids, experts.to(torch.int16)
        self.votes[positions], self.lse[positions] = votes, lse


@dataclass
class BankRows:
    """The bank rows of the current token of each sequence (serving): experts (B, M, L, k), valid (B, M)."""

    experts: torch.Tensor
    valid: torch.Tensor


@dataclass
class RecentTokens:
    """Serving: the prompt's last R routed tokens (a ring buffer, fixed shapes): ids (B, R) (-1 = empty),
    experts (B, R, L, k); `written` counts appends."""

    ids: torch.Tensor
    experts: torch.Tensor
    written: int = 0


class RoutingBank(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_layers: int,
        num_experts: int,
        top_k: int,
        entries: int,
        lookahead: int,
        beta: float,
        decay: float,
        d_out: int,
        recent: int = 0,
    ):
        super().__init__()
        L, E = num_layers, num_experts
        self.L, self.E, self.beta, self.recent = L, E, beta, recent
        self.register_buffer("offsets", torch.zeros(vocab_size + 1, dtype=torch.long))
        self.register_buffer("experts", torch.full((max(entries, 1), L, top_k), -1, dtype=torch.int16))
        self.register_buffer("sequences", torch.full((max(entries, 1),), -1, dtype=torch.long))
        src, tgt = torch.arange(L)[:, None], torch.arange(L)[None, :]
        gap = (tgt - lookahead - src).float()  # (L_src, L_tgt): layers between source l' and l - h
        self.register_buffer("decay_w", torch.where(gap >= 0, decay**gap, 0.0), persistent=False)
        self.gain_lin = nn.Parameter(torch.zeros(L))
        self.gain_log = nn.Parameter(torch.zeros(L))
        self.proj = nn.Linear(E, d_out, bias=False)  # vote -> depth transformer input
        self._cache: dict = {}  # derived from the buffers: reset by fill() and load_state_dict()
        self.register_load_state_dict_post_hook(lambda module, keys: module._cache.clear())

    @torch.no_grad()
    def fill(self, offsets: np.ndarray, experts: np.ndarray, sequences: np.ndarray) -> None:
        """Load arrays from `build_bank` (their sizes must match the config's vocab and bank_entries)."""
        n = max(len(experts), 1)
        if tuple(self.offsets.shape) != offsets.shape or self.experts.shape[0] != n:
            raise ValueError(
                f"bank: offsets {offsets.shape} / {len(experts)} rows do not match the predictor's "
                f"{tuple(self.offsets.shape)} / bank_entries {self.experts.shape[0]}"
            )
        self.offsets.copy_(torch.from_numpy(offsets))
        if len(experts):
            self.experts.copy_(torch.from_numpy(experts))
            self.sequences.copy_(torch.from_numpy(sequences))
        self._cache.clear()

    @property
    def width(self) -> int:
        """M: rows of the most frequent token (serving pads every token's rows to it)."""
        if "width" not in self._cache:
            self._cache["width"] = max(1, int((self.offsets[1:] - self.offsets[:-1]).max()))
        return self._cache["width"]

    def readout(self, vote: torch.Tensor, layers: slice) -> torch.Tensor:
        """vote (..., n', E) -> (..., n', E) logits for `layers`."""
        a, b = self.gain_lin[layers, None], self.gain_log[layers, None]
        return a * vote + b * torch.log(vote + EPS)

    # ------------------------------------------------------------------ whole sequences

    def _bank_hot(self) -> tuple[torch.Tensor, np.ndarray]:
        hot = self._cache.get("hot")
        if hot is None or hot.device != self.experts.device:
            # (L, N, E): a token's rows are then one (L, r, E) slice that batched matmuls read in place
            hot = expert_multi_hot(self.experts.long(), self.E, torch.float32).transpose(0, 1).contiguous()
            self._cache["hot"] = hot
            self._cache["offsets"] = self.offsets.cpu().numpy()
        return hot, self._cache["offsets"]

    @torch.no_grad()
    def sequence_votes(
        self,
        token_ids: torch.Tensor,
        experts: torch.Tensor,
        exclude: torch.Tensor | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whole sequences: token_ids (B, T) (-1 = padding), experts (B, T, L, k), exclude (B,) sequence ids
        or None, positions (B, T) or None -> votes (B, T, L, E).

        The bank's rows (`votes`) and, with `recent` > 0, the row's own earlier tokens t - recent <= t' < t
        of the same id share one softmax."""
        B, T = token_ids.shape
        ex = None if exclude is None else exclude[:, None].expand(B, T).reshape(-1)
        pos = None if positions is None else positions.reshape(-1)
        flat = experts.reshape(B * T, *experts.shape[2:])
        vote, lse = self._bank_votes(token_ids.reshape(-1), flat, ex, pos)
        if self.recent:
            vote = self._merge_recent(token_ids, experts, vote, lse)
        return vote.view(B, T, self.L, self.E)

    @torch.no_grad()
    def votes(
        self,
        token_ids: torch.Tensor,
        experts: torch.Tensor,
        exclude: torch.Tensor | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The bank rows' vote alone: token_ids (N,) (-1 = padding), experts (N, L, k), exclude (N,)
        sequence ids or None, positions (N,) or None -> (N, L, E)."""
        return self._bank_votes(token_ids, experts, exclude, positions)[0]

    def _bank_votes(self, token_ids, experts, exclude, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """-> votes (N, L, E) and the log of their softmax normalisers (N, L) (-inf: no rows).

        With `exclude` and `positions` (each token's position in its sequence), votes are memoised by
        (sequence, position): the vote has no learned parameter, so every epoch after the first reads
        it back instead of recomputing it. A memo entry is used only when its token id and routing equal
        the query's; votes are rounded to float16 whether computed or read back, so both agree."""
        if exclude is None or positions is None:
            return self._votes(token_ids, experts, exclude)
        return self._memo_votes(token_ids, experts, exclude, positions)

    def _memo_votes(self, token_ids, experts, sequences, positions) -> tuple[torch.Tensor, torch.Tensor]:
        memo: dict[int, _SequenceVotes] = self._cache.setdefault("memo", {})
        dev = token_ids.device
        out = torch.zeros(token_ids.shape[0], self.L, self.E, dtype=torch.float16, device=dev)
        lse = torch.full((token_ids.shape[0], self.L), float("-inf"), device=dev)
        real = (token_ids >= 0) & (positions >= 0)  # padding keeps a zero vote and is not stored
        todo = real.clone()
        groups = {s: torch.nonzero(real & (sequences == s)).squeeze(1) for s in torch.unique(sequences[real]).tolist()}
        for s, idx in groups.items():
            if s in memo:
                hit = idx[memo[s].match(positions[idx], token_ids[idx], experts[idx])]
                out[hit], lse[hit] = memo[s].votes[positions[hit]], memo[s].lse[positions[hit]]
                todo[hit] = False
        if bool(todo.any()):
            vote, new_lse = self._votes(token_ids[todo], experts[todo], sequences[todo])
            out[todo], lse[todo] = vote.to(torch.float16), new_lse
            for s, idx in groups.items():
                new = idx[todo[idx]]
                if len(new):
                    entry = memo.setdefault(s, _SequenceVotes(self.L, self.E, experts.shape[-1], dev))
                    entry.store(positions[new], token_ids[new], experts[new], out[new], lse[new])
        return out.to(self.gain_lin.dtype), lse

    def _votes(self, token_ids, experts, exclude) -> tuple[torch.Tensor, torch.Tensor]:
        bank_hot, offsets = self._bank_hot()
        hot = expert_multi_hot(experts, self.E, torch.float32)  # (N, L, E)
        out = hot.new_zeros(hot.shape)
        lse = hot.new_full(hot.shape[:2], float("-inf"))  # (N, L)
        ids = token_ids.cpu().numpy()
        order = np.argsort(ids, kind="stable")
        uniq, first = np.unique(ids[order], return_index=True)
        bounds = np.append(first, len(ids))
        beta_decay = self.beta * self.decay_w.T  # (L_tgt, L_src)
        for i, v in enumerate(uniq):
            a, b = (offsets[v], offsets[v + 1]) if v >= 0 else (0, 0)
            if a == b:  # padding, or a token the bank never saw: zero vote
                continue
            q = torch.from_numpy(order[bounds[i] : bounds[i + 1]]).to(hot.device)
            rows = bank_hot[:, a:b]  # (L, r, E)
            overlap = torch.bmm(hot[q].transpose(0, 1), rows.transpose(1, 2))  # (L, q, r)
            # beta * s[l] = sum_l' beta * decay_w[l', l] overlap[l']: layers <= l - h (one matmul for all l)
            logits = (beta_decay @ overlap.flatten(1)).view(overlap.shape)  # (L, q, r)
            if exclude is not None:
                allowed = self.sequences[None, a:b] != exclude[q][:, None]  # (q, r)
                if not bool(allowed.all()):
                    logits = logits.masked_fill(~allowed, float("-inf"))
            w = logits.softmax(-1)
            if exclude is not None and not bool(allowed.any(-1).all()):
                w = torch.nan_to_num(w)  # every row excluded: zero vote
            out[q] = torch.bmm(w, rows).transpose(0, 1)  # (q, L, E)
            lse[q] = logits.logsumexp(-1).T  # (q, L); -inf where every row is excluded
        return out.to(self.gain_lin.dtype), lse

    def _merge_recent(self, token_ids, experts, vote, lse) -> torch.Tensor:
        """Add each token's earlier same-id tokens of its row (t - recent <= t' < t) to its softmax.

        token_ids (B, T), experts (B, T, L, k), the bank's vote (B*T, L, E) and lse (B*T, L) -> (B*T, L, E).
        A pair (t, t') weighs exp(beta * s[t, t', l]) like a bank row; its vote is t''s multi-hot at l."""
        B, T = token_ids.shape
        L, E = self.L, self.E
        t = torch.arange(T, device=token_ids.device)
        band = (t[None, :] < t[:, None]) & (t[None, :] >= t[:, None] - self.recent)  # (T_query, T_key)
        real = token_ids >= 0
        pairs = (token_ids[:, :, None] == token_ids[:, None, :]) & band & real[:, :, None]  # (B, T, T)
        b, tq, tk = pairs.nonzero(as_tuple=True)  # P pairs
        if len(b) == 0:
            return vote
        hot = expert_multi_hot(experts, E, torch.float32)  # (B, T, L, E)
        layer = torch.arange(L, device=token_ids.device)[None, :, None]
        cur = experts[b, tq]  # (P, L, k): the query's experts (only layers <= l - h count, via decay_w)
        overlap = (hot[b[:, None, None], tk[:, None, None], layer, cur.clamp_min(0)]
                   * (cur >= 0)).sum(-1)  # (P, L_src)
        s = self.beta * overlap @ self.decay_w  # (P, L_tgt)
        query = b * T + tq  # (P,) row in the flat (B*T) layout
        top = lse.scatter_reduce(0, query[:, None].expand(-1, L), s, "amax")  # (B*T, L): max of all logits
        top = torch.where(torch.isfinite(top), top, 0.0)
        w_bank = (lse - top).exp()  # (B*T, L): the bank rows' total weight (0 where there are none)
        w = (s - top[query]).exp()  # (P, L)
        total = w_bank.index_add(0, query, w)  # (B*T, L)
        out = (vote.float() * w_bank[..., None]).flatten()  # (B*T*L*E,)
        key = experts[b, tk]  # (P, L, k): what t' routed to
        flat = ((query[:, None, None] * L + layer) * E + key.clamp_min(0)).flatten()
        out.index_add_(0, flat, (w[..., None] * (key >= 0)).expand_as(key).flatten())
        out = out.view(B * T, L, E) / total.clamp_min(1e-30)[..., None]
        return out.to(self.gain_lin.dtype)

    # ------------------------------------------------------------------ serving

    def init_recent(self, batch_size: int, device) -> RecentTokens | None:
        """An empty ring of the prompt's last `recent` routed tokens (None when `recent` is 0)."""
        if not self.recent:
            return None
        k = self.experts.shape[-1]
        return RecentTokens(
            ids=torch.full((batch_size, self.recent), -1, dtype=torch.long, device=device),
            experts=torch.full((batch_size, self.recent, self.L, k), -1, dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def append_recent(self, ring: RecentTokens, token_ids: torch.Tensor, experts: torch.Tensor) -> None:
        """Store a routed token: token_ids (B,), experts (B, L, k). Overwrites the oldest slot."""
        slot = ring.written % self.recent
        ring.ids[:, slot], ring.experts[:, slot] = token_ids, experts
        ring.written += 1

    def lookup(self, token_ids: torch.Tensor, recent: RecentTokens | None = None) -> BankRows:
        """token_ids (B,) -> the bank rows of each token: on CUDA padded to `width` (fixed shapes for CUDA
        graphs), elsewhere only to the batch's largest count (a rare token then costs little). With
        `recent` (required when the bank has `recent` > 0), the prompt's earlier tokens of the same id
        follow as further rows (all R ring slots, valid where the id matches)."""
        if (recent is None) != (not self.recent):
            raise ValueError(
                f"this bank votes with the prompt's last {self.recent} tokens: pass state.recent"
                if recent is None
                else "recent tokens given, but this bank has bank_recent=0"
            )
        v = token_ids.clamp_min(0)
        start = self.offsets[v]
        count = torch.where(token_ids >= 0, self.offsets[v + 1] - start, 0)
        M = self.width if token_ids.is_cuda else max(1, int(count.max()))
        j = torch.arange(M, device=token_ids.device)
        valid = j < count[:, None]  # (B, M)
        idx = torch.where(valid, start[:, None] + j, 0)
        rows = self.experts[idx].long()  # (B, M, L, k)
        if recent is not None:
            same = (recent.ids == token_ids[:, None]) & (token_ids[:, None] >= 0)  # (B, R)
            rows, valid = torch.cat([rows, recent.experts], 1), torch.cat([valid, same], 1)
        return BankRows(experts=rows, valid=valid)

    def vote(self, rows: BankRows, cur_experts: torch.Tensor, stop: int) -> torch.Tensor:
        """rows of B tokens, their experts at the layers known so far (B, n, k) -> votes (B, stop, E)
        for layer positions [0, stop) (reading cur_experts[:, :stop - h] only)."""
        B, M = rows.valid.shape
        s = rows.experts.new_zeros(B, stop, M, dtype=torch.float32)
        n = min(cur_experts.shape[1], self.decay_w.shape[0])
        if n > 0:
            hot = expert_multi_hot(cur_experts[:, :n], self.E, torch.float32)  # (B, n, E)
            ids = rows.experts[:, :, :n].clamp_min(0)  # (B, M, n, k)
            overlap = hot[:, None].expand(B, M, n, self.E).gather(-1, ids).sum(-1)  # (B, M, n)
            s = torch.einsum("bmn,nl->blm", overlap, self.decay_w[:n, :stop])
        w = (self.beta * s).masked_fill(~rows.valid[:, None], float("-inf")).softmax(-1)
        w = torch.nan_to_num(w)  # (B, stop, M)
        k = rows.experts.shape[-1]
        tgt = rows.experts[:, :, :stop].permute(0, 2, 1, 3).reshape(B, stop, M * k)
        out = w.new_zeros(B, stop, self.E + 1)
        out.scatter_add_(-1, torch.where(tgt >= 0, tgt, self.E), w[..., None].expand(B, stop, M, k).reshape(B, stop, -1))
        return out[..., : self.E].to(self.gain_lin.dtype)
