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

Training reads the bank built from its own split, so `exclude` drops the rows of the query's own
sequence: a token never votes for itself (or for its prompt's later tokens), and the vote is as good
in training as on a new prompt.

Storage, grouped by token id (CSR): `offsets` (V+1,), `experts` (N, L, k) int16, `sequences` (N,)
(the prompt id of each row). Two ways to compute the same vote (tests/test_bank.py checks they agree):
* `votes` (training, evaluation: whole sequences): one batched matmul per distinct token over a cached
  float multi-hot of the bank (N x L x E floats: 1 GB for Puffin; built on first use); given positions,
  it memoises each (prompt, position)'s vote (float16, tokens x L x E x 2 bytes: 0.6 GB for Puffin's
  192 k tokens; it is not bounded, so it grows with the data), so only the first epoch pays for it
  (about a quarter of a CPU training step);
* `lookup` + `vote` (serving, one token per sequence): gathers over the int16 ids, no cache; on CUDA
  the rows are padded to the most frequent token's count, so shapes never change (CUDA graphs).
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
    routing each vote was computed for (a lookup must match both), and the vote itself (float16)."""

    def __init__(self, L: int, E: int, k: int, device: torch.device):
        self.ids = torch.full((0,), -1, dtype=torch.long, device=device)
        self.experts = torch.zeros(0, L, k, dtype=torch.int16, device=device)
        self.votes = torch.zeros(0, L, E, dtype=torch.float16, device=device)

    def match(self, positions: torch.Tensor, token_ids: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        inside = positions < len(self.ids)
        p = torch.where(inside, positions, 0)
        same = (self.ids[p] == token_ids) & (self.experts[p] == experts).flatten(1).all(1)
        return inside & same

    def store(self, positions, token_ids, experts, votes) -> None:
        n = int(positions.max()) + 1
        if n > len(self.ids):
            grow = n - len(self.ids)
            self.ids = torch.cat([self.ids, self.ids.new_full((grow,), -1)])
            self.experts = torch.cat([self.experts, self.experts.new_zeros(grow, *self.experts.shape[1:])])
            self.votes = torch.cat([self.votes, self.votes.new_zeros(grow, *self.votes.shape[1:])])
        self.ids[positions], self.experts[positions], self.votes[positions] = token_ids, experts.to(torch.int16), votes


@dataclass
class BankRows:
    """The bank rows of the current token of each sequence (serving): experts (B, M, L, k), valid (B, M)."""

    experts: torch.Tensor
    valid: torch.Tensor


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
    ):
        super().__init__()
        L, E = num_layers, num_experts
        self.L, self.E, self.beta = L, E, beta
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
    def votes(
        self,
        token_ids: torch.Tensor,
        experts: torch.Tensor,
        exclude: torch.Tensor | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_ids (N,) (-1 = padding), experts (N, L, k), exclude (N,) sequence ids or None -> (N, L, E).

        With `exclude` and `positions` (N,) (each token's position in its sequence), votes are memoised by
        (sequence, position): the vote has no learned parameter, so every epoch after the first reads
        it back instead of recomputing it. A memo entry is used only when its token id and routing equal
        the query's; votes are rounded to float16 whether computed or read back, so both agree."""
        if exclude is None or positions is None:
            return self._votes(token_ids, experts, exclude)
        return self._memo_votes(token_ids, experts, exclude, positions)

    def _memo_votes(self, token_ids, experts, sequences, positions) -> torch.Tensor:
        memo: dict[int, _SequenceVotes] = self._cache.setdefault("memo", {})
        dev = token_ids.device
        out = torch.zeros(token_ids.shape[0], self.L, self.E, dtype=torch.float16, device=dev)
        real = (token_ids >= 0) & (positions >= 0)  # padding keeps a zero vote and is not stored
        todo = real.clone()
        groups = {s: torch.nonzero(real & (sequences == s)).squeeze(1) for s in torch.unique(sequences[real]).tolist()}
        for s, idx in groups.items():
            if s in memo:
                hit = idx[memo[s].match(positions[idx], token_ids[idx], experts[idx])]
                out[hit] = memo[s].votes[positions[hit]]
                todo[hit] = False
        if bool(todo.any()):
            out[todo] = self._votes(token_ids[todo], experts[todo], sequences[todo]).to(torch.float16)
            for s, idx in groups.items():
                new = idx[todo[idx]]
                if len(new):
                    entry = memo.setdefault(s, _SequenceVotes(self.L, self.E, experts.shape[-1], dev))
                    entry.store(positions[new], token_ids[new], experts[new], out[new])
        return out.to(self.gain_lin.dtype)

    def _votes(self, token_ids: torch.Tensor, experts: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
        bank_hot, offsets = self._bank_hot()
        hot = expert_multi_hot(experts, self.E, torch.float32)  # (N, L, E)
        out = hot.new_zeros(hot.shape)
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
        return out.to(self.gain_lin.dtype)

    # ------------------------------------------------------------------ serving

    def lookup(self, token_ids: torch.Tensor) -> BankRows:
        """token_ids (B,) -> the bank rows of each token: on CUDA padded to `width` (fixed shapes for CUDA
        graphs), elsewhere only to the batch's largest count (a rare token then costs little)."""
        v = token_ids.clamp_min(0)
        start = self.offsets[v]
        count = torch.where(token_ids >= 0, self.offsets[v + 1] - start, 0)
        M = self.width if token_ids.is_cuda else max(1, int(count.max()))
        j = torch.arange(M, device=token_ids.device)
        valid = j < count[:, None]  # (B, M)
        idx = torch.where(valid, start[:, None] + j, 0)
        return BankRows(experts=self.experts[idx].long(), valid=valid)  # (B, M, L, k)

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
