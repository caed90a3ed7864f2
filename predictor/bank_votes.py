"""The routing bank's vote arithmetic (predictor/bank.py holds the formula and the contributor): the
softmax vote of queries over candidate rows, split into its overlap and vote steps for incremental
serving, the merge of votes over disjoint row sets, and the training memo of whole-sequence votes."""

from __future__ import annotations

import numpy as np
import torch

NEG_INF = float("-inf")


class _SequenceVotes:
    """Memoised votes of one sequence, by position (grown as later positions arrive): the token id and
    routing each vote was computed for (a lookup must match both), the vote itself (float16) and the
    log of its softmax normaliser (float32; merging in the prompt's own rows needs it)."""

    def __init__(self, L: int, E: int, routed_shape: tuple, device: torch.device):
        self.ids = torch.full((0,), -1, dtype=torch.long, device=device)
        self.experts = torch.zeros(0, *routed_shape, dtype=torch.int16, device=device)
        self.votes = torch.zeros(0, L, E, dtype=torch.float16, device=device)
        self.lse = torch.zeros(0, L, dtype=torch.float32, device=device)

    @staticmethod
    def position_bytes(L: int, E: int, routed_shape: tuple) -> int:
        """Bytes one memoised position takes: token id, routing (int16), vote (float16), normaliser."""
        return 8 + 2 * int(np.prod(routed_shape)) + 2 * L * E + 4 * L

    def growth(self, positions: torch.Tensor) -> int:
        """Positions `store(positions, ...)` would add (the entry grows to the largest position)."""
        return max(0, int(positions.max()) + 1 - len(self.ids))

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


def softmax_vote(q_hot, rows_hot, allowed, beta_decay, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The vote of queries over candidate rows, in G independent groups.

    q_hot (G, q, n, E): the queries' routing at the layers they may read; rows_hot (G, r, L, E);
    allowed (G, q, r) bool; beta_decay (L_src, L_tgt) = beta * decay weights (zero where l' > l - h)
    -> vote (G, q, stop, E) and the log of its softmax normaliser (G, q, stop) (-inf: no row allowed).
    """
    return vote_from_overlap(layer_overlap(q_hot, rows_hot), rows_hot, allowed, beta_decay, 0, stop)


def layer_overlap(q_hot, rows_hot, first: int = 0) -> torch.Tensor:
    """|query & row| per source layer: q_hot (G, q, n, E) at layers [first, first + n) -> (G, n, q, r)."""
    n = q_hot.shape[2]
    return torch.einsum("gqne,grne->gnqr", q_hot, rows_hot[:, :, first : first + n])


def vote_from_overlap(overlap, rows_hot, allowed, beta_decay, start: int, stop: int):
    """`softmax_vote` for target layers [start, stop) from the overlaps of source layers [0, n):
    overlap (G, n, q, r) -> vote (G, q, stop - start, E), lse (G, q, stop - start)."""
    n = overlap.shape[1]
    s = torch.einsum("gnqr,nl->glqr", overlap, beta_decay[:n, start:stop].to(overlap.dtype))  # (G, stop - start, q, r)
    s = s.masked_fill(~allowed[:, None], NEG_INF)
    lse = s.logsumexp(-1)  # (G, l, q)
    w = torch.nan_to_num((s - lse[..., None]).exp())  # no row allowed: zero weights
    vote = torch.einsum("glqr,grle->gqle", w, rows_hot[:, :, start:stop])
    return vote, lse.transpose(1, 2)


def merge_votes(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Votes over disjoint row sets, each (vote (..., E), lse (...)) -> the vote over their union."""
    if len(parts) == 1:
        return parts[0][0].float()
    lse = torch.stack([p[1] for p in parts])  # (P, ...)
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w = (lse - top).exp()  # (P, ...): each part's share of the total weight
    total = w.sum(0).clamp_min(1e-30)
    return sum(p[0].float() * (wi / total)[..., None] for p, wi in zip(parts, w))
