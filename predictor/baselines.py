"""Heuristic expert predictors of DESIGN.md: the bars a learned predictor has to clear.

Every baseline has `fit(data)` (a TraceSet or an iterable of TraceRecords: the train rows) and
`scores(record) -> (T, L, E) float32`, higher = more likely routed. Scores are never negative; those
of Frequency, TokenTable and CoOccurrenceToken estimate P(routed) and sum to k over the experts of
a (token, layer); PreviousToken's lie in [0, 1] and only rank. `mode` and `lookahead` state what a
score may read, with the meaning of PredictorConfig:

- token_ahead: scores[t] uses tokens <= t and the expert sets of tokens < t (any layer);
  `lookahead` is None (the whole token is predicted before its forward pass).
- layer_ahead with lookahead h: additionally, for scores[t, l], the current token's expert sets
  at layers <= l - h.

Tables are numpy and fitted in one pass of bincounts (the counting is predictor/routing_stats.py), so the
simulator can use them as well. Fitting streams: `fit` reads the train rows a chunk at a time
(predictor/chunks.py) and adds up counts (`fit_all` fits several baselines in one pass), so its memory
is the chunk plus the tables (TokenTable: seen tokens x L x E), not the train split; only the routing
bank's vote keeps every train row by design (int16, L x k x 2 bytes per token).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .chunks import DEFAULT_CHUNK_TOKENS, arrow_arrays, row_chunks
from .config import check_lookahead
from .routing_stats import cooccurrence_counts, layer_counts, multi_hot
from .traces import TraceRecord, TraceSet


def stack(data: TraceSet | Iterable[TraceRecord]) -> tuple[np.ndarray, np.ndarray]:
    """All rows concatenated: token ids (N,) and experts (N, L, k), both int64."""
    tokens, experts, _ = stack_rows(data)
    return tokens, experts


def stack_rows(data: TraceSet | Iterable[TraceRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`stack` plus the row lengths (R,), for statistics that must not cross row boundaries."""
    if isinstance(data, TraceSet):
        return _stack_arrow(data)
    tokens, experts = [], []
    for rec in data:
        tokens.append(np.asarray(rec.token_ids, dtype=np.int64))
        experts.append(np.asarray(rec.experts, dtype=np.int64))
    if not tokens:
        raise ValueError("no rows to stack")
    return np.concatenate(tokens), np.concatenate(experts), np.array([len(t) for t in tokens])


def _stack_arrow(ts: TraceSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # one pass over the Arrow buffers instead of one numpy conversion per row; `[:]` applies a select()
    table = ts.dataset.with_format("arrow")[:]
    if table.num_rows == 0:
        raise ValueError(f"{ts.path}: no rows to stack")
    chunk = arrow_arrays(table, ts.meta.num_moe_layers, ts.meta.top_k)
    return chunk.tokens, chunk.experts, chunk.lengths


def fit_all(baselines: list[Baseline], data: TraceSet | Iterable[TraceRecord],
            max_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[Baseline]:
    """Fit every baseline on the same train rows in one streamed pass (each reads every chunk)."""
    for b in baselines:
        b.begin()
    for chunk in row_chunks(data, max_tokens):
        for b in baselines:
            b.update(chunk.tokens, chunk.experts)
    return [b.finish() for b in baselines]


class Baseline:
    name = "baseline"
    mode = "token_ahead"
    lookahead: int | None = None
    scores_are_probs = False  # True: the scores estimate P(routed), read as probabilities by the evaluation

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.freq: np.ndarray | None = None  # (L, E), every baseline's fallback

    def fit(self, data: TraceSet | Iterable[TraceRecord], max_tokens: int = DEFAULT_CHUNK_TOKENS) -> Baseline:
        """Fit on the train rows, read `max_tokens` tokens of whole rows at a time."""
        return fit_all([self], data, max_tokens)[0]

    def fit_arrays(self, tokens: np.ndarray, experts: np.ndarray) -> Baseline:
        """Fit on rows already concatenated by `stack`."""
        self.begin()
        self.update(tokens, experts)
        return self.finish()

    # streamed fitting: begin(), update() per chunk of rows, finish(); counts add up over chunks
    def begin(self) -> None:
        self._counts, self._tokens = None, 0
        self._begin()

    def update(self, tokens: np.ndarray, experts: np.ndarray) -> None:
        counts = layer_counts(experts, self.num_experts)
        self._counts = counts if self._counts is None else self._counts + counts
        self._tokens += len(tokens)
        self._update(np.asarray(tokens, dtype=np.int64), experts)

    def finish(self) -> Baseline:
        if not self._tokens:
            raise ValueError(f"{type(self).__name__}: no rows to fit on")
        self.freq = (self._counts / self._tokens).astype(np.float32)  # = routing_stats.layer_frequency
        self._finish()
        self._counts = None
        return self

    def _begin(self) -> None:
        pass

    def _update(self, tokens: np.ndarray, experts: np.ndarray) -> None:
        pass

    def _finish(self) -> None:
        pass

    def scores(self, record: TraceRecord) -> np.ndarray:
        if self.freq is None:
            raise RuntimeError(f"{type(self).__name__}.scores called before fit()")
        experts = np.asarray(record.experts, dtype=np.int64)
        if experts.shape[1] != len(self.freq):
            raise ValueError(f"record has {experts.shape[1]} MoE layers, the baseline was fitted on {len(self.freq)}")
        return self._scores(np.asarray(record.token_ids, dtype=np.int64), experts).astype(np.float32, copy=False)

    def _scores(self, tokens: np.ndarray, experts: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Frequency(Baseline):
    """Per-layer global popularity: the same ranking for every token (reads nothing of the sequence)."""

    name = "frequency"
    scores_are_probs = True

    def _scores(self, tokens, experts):
        return np.broadcast_to(self.freq, (len(tokens), *self.freq.shape)).copy()


class PreviousToken(Baseline):
    """The previous token's experts at the same layer; popularity breaks ties and covers t = 0."""

    name = "previous_token"

    def _scores(self, tokens, experts):
        out = np.broadcast_to(self.freq, (len(tokens), *self.freq.shape)).copy()  # in [0, 1]
        out[1:] += 2.0 * multi_hot(experts[:-1], self.num_experts)  # a repeat outranks any frequency
        return out / 3.0


class TokenTable(Baseline):
    """P(expert | token id, layer) counted on train rows, smoothed towards the layer's popularity.

    `prior` is the pseudo-count of the smoothing: a token seen n times gets
    (counts + prior * freq) / (n + prior), so an unseen token falls back to plain frequency.
    Only tokens seen in training get a table row, so memory follows the train set, not the vocab.
    """

    name = "token_table"
    scores_are_probs = True

    def __init__(self, num_experts: int, prior: float = 1.0):
        super().__init__(num_experts)
        self.prior = prior

    def _begin(self):
        # per token id seen so far, in order of arrival: its row of the counts (grown by doubling)
        self._row: dict[int, int] = {}
        self._n = np.zeros(0, dtype=np.int64)  # occurrences per row
        self._by_expert = None  # (rows, L, E) int32 routed counts; int64 once a token passes 2^31 - 1

    def _update(self, tokens, experts):
        E, L = self.num_experts, experts.shape[1]
        uniq, inv = np.unique(tokens, return_inverse=True)
        rows = np.fromiter((self._row.setdefault(int(v), len(self._row)) for v in uniq), np.int64, len(uniq))
        need = len(self._row)
        if len(self._n) < need:
            size = max(need, 2 * len(self._n))
            grown = np.zeros((size, L, E), dtype=np.int32 if self._by_expert is None else self._by_expert.dtype)
            if self._by_expert is not None:
                grown[: len(self._n)] = self._by_expert
            self._by_expert, self._n = grown, np.concatenate([self._n, np.zeros(size - len(self._n), np.int64)])
        row = rows[inv.ravel()]
        self._n[:need] += np.bincount(row, minlength=need)
        if self._by_expert.dtype == np.int32 and self._n.max() > np.iinfo(np.int32).max:
            self._by_expert = self._by_expert.astype(np.int64)
        for layer in range(L):  # one layer at a time keeps the index arrays at N * k
            counts = np.bincount((row[:, None] * E + experts[:, layer]).ravel(), minlength=need * E)
            self._by_expert[:need, layer] += counts.reshape(need, E).astype(self._by_expert.dtype, copy=False)

    def _finish(self):
        E, L = self.num_experts, self.freq.shape[0]
        ids = np.fromiter(self._row, np.int64, len(self._row))
        order = np.argsort(ids)
        seen, n = ids[order], self._n[order].astype(np.float32)[:, None]
        self.table = np.empty((len(seen) + 1, L, E), dtype=np.float32)
        self.table[-1] = self.freq  # last row: unseen tokens
        for layer in range(L):
            counts = self._by_expert[order, layer]
            self.table[:-1, layer] = (counts + self.prior * self.freq[layer]) / (n + self.prior)
        self.seen = seen
        self._row, self._n, self._by_expert = {}, None, None

    def _scores(self, tokens, experts):
        pos = np.searchsorted(self.seen, tokens)
        known = (pos < len(self.seen)) & (self.seen[np.minimum(pos, len(self.seen) - 1)] == tokens)
        return self.table[np.where(known, pos, len(self.seen))]


class CoOccurrenceToken(Baseline):
    """Layer-ahead: the token table combined with the current token's experts h layers up.

    Naive Bayes over the k experts S routed at layer l - h:
    log P(j | token, S) = log P_tok(j) + sum_{i in S} log [P(j at l | i at l - h) / P(j at l)] + const,
    with both tables counted on train rows, normalised over the E experts and scaled to sum to k, none
    above 1 (`capped_probs`).
    Layers l < h have no earlier layer to read and use the token table alone.
    """

    name = "cooccurrence_token"
    scores_are_probs = True
    mode = "layer_ahead"

    def __init__(self, num_experts: int, lookahead: int = 1, prior: float = 1.0):
        super().__init__(num_experts)
        self.lookahead = check_lookahead(lookahead)
        self.tokens = TokenTable(num_experts, prior)

    def _begin(self):
        self.tokens.begin()
        self._pairs, self._k = None, None

    def _update(self, tokens, experts):
        self.tokens.update(tokens, experts)
        # counts[l, i, j]: tokens routed to i at layer l and to j at layer l + h (all k x k pairs)
        counts = cooccurrence_counts(experts, self.num_experts, self.lookahead)
        self._pairs = counts if self._pairs is None else self._pairs + counts
        self._k = experts.shape[-1]

    def _finish(self):
        h, k = self.lookahead, self._k
        self.tokens.finish()
        counts = self._pairs.astype(np.float32)
        self._pairs = None
        seen = counts.sum(-1, keepdims=True) / k  # times i was routed at layer l - h
        freq = np.maximum(self.freq[h:, None, :], 1e-6)  # an expert never routed in training
        cond = (counts + freq) / (seen + 1.0)  # one pseudo-count of popularity
        self.log_lift = np.log(cond / freq)  # (max(L - h, 0), E, E)

    def _scores(self, tokens, experts):
        h, L = self.lookahead, experts.shape[1]
        # the table is smoothed, so only an expert never routed in training sits at the floor
        out = np.log(np.maximum(self.tokens._scores(tokens, experts), 1e-12))
        n = max(L - h, 0)
        # log_lift[l - h, i, :] summed over the k experts i of layer l - h, for layers l >= h
        out[:, h:] += self.log_lift[np.arange(n)[None, :, None], experts[:, :n]].sum(2)
        out = np.exp(out - out.max(-1, keepdims=True))
        return capped_probs(out / out.sum(-1, keepdims=True), experts.shape[-1])


def capped_probs(q: np.ndarray, k: int) -> np.ndarray:
    """(..., E) distributions over the experts -> P(routed), each below 1 and summing to k over a row with
    at least k non-zero entries: 1 - exp(-c q), c solved per row. Monotone in q, so the order (every
    recall, the order copies are issued in) is q's, but for experts so likely (c q above about 17) that
    float32 reads them as exactly 1; k * q alone put confident experts above 1, which the evaluation and
    the scheduler clip, losing mass, and a hard cap at 1 tied every one of them."""
    dtype, q = np.asarray(q).dtype, np.asarray(q, dtype=np.float64)
    c = np.full(q.shape[:-1] + (1,), float(k))  # f(c) = sum(1 - exp(-c q)) - k <= 0 here: 1 - exp(-x) <= x
    for _ in range(12):  # Newton from the left on a concave f: monotone, quadratic near the root (6-8 steps)
        e = np.exp(-c * q)
        f = k - (1 - e).sum(-1, keepdims=True)
        if f.max() < 1e-9:
            break
        c = np.minimum(c + f / np.maximum((q * e).sum(-1, keepdims=True), 1e-300), 1e30)  # rows of < k experts: 1e30
    return (-np.expm1(-c * q)).astype(dtype, copy=False)


class RoutingBankVote(Baseline):
    """Layer-ahead: the routing bank's vote alone (predictor/bank.py, no learned part): every train
    occurrence of the token votes for its experts at layer l, weighted by softmax(beta * overlap of its
    routing at layers <= l - h with the current token's, decayed by distance). Frequency breaks ties
    and stands in for tokens never seen in training. Scores sum to k.
    """

    name = "routing_bank"
    scores_are_probs = True
    mode = "layer_ahead"
    recent = 0  # > 0: the prompt's own last `recent` tokens of the same id vote too

    def __init__(self, num_experts: int, lookahead: int = 1, beta: float = 2.0, decay: float = 0.7):
        super().__init__(num_experts)
        self.lookahead, self.beta, self.decay = check_lookahead(lookahead), beta, decay

    def _begin(self):
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []  # every train row: the bank keeps them all

    def _update(self, tokens, experts):
        self._rows.append((tokens, np.asarray(experts).astype(np.int16)))

    def _finish(self):
        from .bank import RoutingBank

        tokens, experts = (np.concatenate(part) for part in zip(*self._rows))
        self._rows = []
        self.vocab_size = int(tokens.max()) + 1
        N, L, k = experts.shape
        self.bank = RoutingBank(self.vocab_size, L, self.num_experts, k, self.lookahead, self.beta, self.decay, 1,
                                size=len(tokens), recent=self.recent)
        self.bank.fill_from_rows(tokens, experts, np.zeros(len(tokens), dtype=np.int64))

    def _scores(self, tokens, experts):
        import torch

        ids = torch.from_numpy(np.where(tokens < self.vocab_size, tokens, -1))
        ex = torch.from_numpy(experts)
        # one record = one prompt, so with `recent` its own earlier tokens join the vote
        vote = self.bank.sequence_votes(ids[None], ex[None])[0].numpy()
        seen = vote.sum(-1, keepdims=True) > 0
        return np.where(seen, (vote + 1e-3 * self.freq) / (1 + 1e-3), self.freq)


class RoutingBankRecentVote(RoutingBankVote):
    """`routing_bank` plus the prompt's own last 512 tokens of the same id as further rows (the vote of
    a predictor with `bank_recent: 512`, alone; a token never seen in training can still vote)."""

    name = "routing_bank_recent"
    recent = 512


def all_baselines(num_experts: int, lookahead: int = 1) -> list[Baseline]:
    """The baselines of DESIGN.md in their order of strength (unfitted), then the routing bank's vote;
    the layer_ahead ones read the current token's layers <= l - lookahead."""
    return [
        Frequency(num_experts),
        PreviousToken(num_experts),
        TokenTable(num_experts),
        CoOccurrenceToken(num_experts, lookahead),
        RoutingBankVote(num_experts, lookahead),
        RoutingBankRecentVote(num_experts, lookahead),
    ]
