"""Scorers: anything that rates every (token, layer, expert) of a trace row ahead of time.

A scorer is duck-typed: the simulator only needs
    name: str
    mode: str                  "token_ahead" | "layer_ahead" | "layer_output" (run.py: when each is known)
    lookahead: int | None      h in layer_ahead mode (None in token_ahead)
    scores(record) -> (T, L, E) float array, higher = more likely routed
(and `fit(train rows)` where it learns anything). The classes of predictor/baselines.py are scorers
as they are. This module adds the learned predictor, MoE-Infinity's activation-matrix matching,
previous-layer co-occurrence without the token table, the recorded cross-layer gate, and the oracle.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from predictor.chunks import row_chunks
from predictor.config import check_lookahead
from predictor.routing_stats import cooccurrence_counts, layer_counts, layer_frequency, multi_hot
from predictor.traces import TraceRecord, TraceSet

from .top import top_stable


def top_budget(scores: np.ndarray, budget: int) -> np.ndarray:
    """(T, L, E) scores -> (T, L, budget) int16 expert ids, best first (ties: lower id first)."""
    scores = np.asarray(scores)
    E = scores.shape[-1]
    if not 1 <= budget <= E:
        raise ValueError(f"prefetch budget must be in [1, {E}], got {budget}")
    return top_stable(scores, budget).astype(np.int16)


class PredictorScorer:
    """An ExpertPredictor run teacher-forced over a whole record (its causality is the model's); one
    with gate_inputs also reads the record's cross-layer gate picks, and is known when they are
    (mode layer_output)."""

    def __init__(self, model, name: str = "predictor", device: str = "cpu"):
        import torch

        self.model = model.to(device).eval()
        self.device = device
        self.name = name
        cfg = model.config
        self.mode = cfg.timing
        self.lookahead = cfg.lookahead if self.mode == "layer_ahead" else None
        self.gate_inputs = cfg.gate_inputs
        self.vocab_size = cfg.vocab_size
        self.calibration = getattr(model, "calibration", None)  # its probabilities' map (predictor/calibration.py)
        self._torch = torch

    def scores(self, record: TraceRecord) -> np.ndarray:
        torch = self._torch
        ids = np.asarray(record.token_ids, dtype=np.int64)
        if ids.size and ids.max() >= self.vocab_size:
            raise ValueError(
                f"prompt {record.prompt_id}: token id {int(ids.max())} >= predictor vocab_size {self.vocab_size}; "
                "the traces use another token-id space than the predictor was trained on"
            )
        gate = None
        if self.gate_inputs:
            if record.gate_ahead is None or record.gate_ahead.shape[-1] < self.gate_inputs:
                got = None if record.gate_ahead is None else record.gate_ahead.shape[-1]
                raise ValueError(f"prompt {record.prompt_id}: the predictor reads {self.gate_inputs} cross-layer gate "
                                 f"picks per layer (gate_inputs), the traces hold {got} (collect.py record_gate_ahead)")
            gate = torch.from_numpy(np.asarray(record.gate_ahead, dtype=np.int64))[None].to(self.device)
        with torch.inference_mode():
            logits = self.model(
                torch.from_numpy(ids)[None].to(self.device),
                torch.from_numpy(np.asarray(record.experts, dtype=np.int64))[None].to(self.device),
                gate=gate,
            )
        return logits[0].float().cpu().numpy()


class ActivationMatrixScorer:
    """MoE-Infinity-style: match the request's partial expert activation matrix (EAM) against the
    per-sequence EAMs of the train split, and score experts by the best match's activation ratio.

    At (t, l) the partial EAM counts the routed experts of tokens < t at every layer and, in
    layer_ahead mode, of token t at layers <= l - h. The best match maximises cosine similarity;
    the score of layer l is that sequence's share of tokens routed to each expert at layer l,
    plus a small global-frequency term that breaks ties (and is all there is before anything
    has been routed).
    """

    name = "moe_infinity"

    def __init__(
        self, num_experts: int, mode: str = "layer_ahead", lookahead: int | None = 1, max_matrices: int = 2000
    ):
        if mode not in ("token_ahead", "layer_ahead"):
            raise ValueError(f"mode must be token_ahead or layer_ahead, got {mode!r}")
        self.num_experts = num_experts
        self.mode = mode
        self.lookahead = int(lookahead or 1) if mode == "layer_ahead" else None
        self.max_matrices = max_matrices

    def fit(self, data: TraceSet | Iterable[TraceRecord]) -> ActivationMatrixScorer:
        # MoE-Infinity keeps a bounded collection: a TraceSet has its rows counted, so only the kept ones are
        # read, and in chunks (predictor/chunks.py) rather than row by row through the memory map
        if isinstance(data, TraceSet):
            kept = data.select(self._kept(len(data))) if len(data) > self.max_matrices else data
            data = (ex for chunk in row_chunks(kept) for ex in np.split(chunk.experts, np.cumsum(chunk.lengths)[:-1]))
        else:
            data = (r.experts for r in data)
        # each sequence's activation ratio: the share of its tokens routed to (layer, expert)
        mats = [layer_frequency(np.asarray(ex, dtype=np.int64), self.num_experts).ravel() for ex in data]
        if not mats:
            raise ValueError("cannot fit the activation-matrix scorer on zero sequences")
        if len(mats) > self.max_matrices:
            mats = [mats[i] for i in self._kept(len(mats))]
        ratio = np.stack(mats)  # (N, L * E) activation ratio per sequence
        self.num_layers = ratio.shape[1] // self.num_experts
        self.ratio = ratio.reshape(len(mats), self.num_layers, self.num_experts)
        self.unit = ratio / np.linalg.norm(ratio, axis=1, keepdims=True)  # for cosine similarity
        self.freq = self.ratio.mean(0)  # (L, E)
        return self

    def _kept(self, n: int) -> np.ndarray:
        return np.sort(np.random.default_rng(0).choice(n, self.max_matrices, replace=False))

    def scores(self, record: TraceRecord) -> np.ndarray:
        ex = np.asarray(record.experts, dtype=np.int64)
        T, L, _ = ex.shape
        E = self.num_experts
        if L != self.num_layers:
            raise ValueError(f"record has {L} MoE layers, the scorer was fitted on {self.num_layers}")
        N = len(self.unit)
        unit_t = self.unit.reshape(N, L, E).transpose(1, 2, 0)  # (L, E, N)
        out = np.empty((T, L, E), dtype=np.float32)
        carry = np.zeros(N, dtype=np.float32)  # dot products of tokens before the chunk
        for lo in range(0, T, 256):  # chunks of tokens bound the (chunk, L, N) buffer
            chunk = ex[lo : lo + 256]
            # cum[t, l]: dot products with every stored EAM of token t's layers <= l
            cum = np.stack([unit_t[layer][chunk[:, layer]].sum(1) for layer in range(L)], axis=1)
            np.cumsum(cum, axis=1, out=cum)
            total = cum[:, -1]
            before = carry + np.cumsum(total, axis=0) - total  # tokens < t, all layers
            carry = carry + total.sum(0)
            for layer in range(L):
                dots = before
                if self.lookahead is not None and layer - self.lookahead >= 0:
                    dots = before + cum[:, layer - self.lookahead]
                best = dots.argmax(1)
                seen = dots.max(1) > 0
                out[lo : lo + 256, layer] = (
                    np.where(seen[:, None], self.ratio[best, layer], 0.0) + 1e-3 * self.freq[layer]
                )
        return out


class CoOccurrenceScorer:
    """Layer-ahead co-occurrence alone (no token table): scores[t, l, j] = mean over the experts i
    routed to token t at layer l - h of P(j at l | i at l - h), counted on train rows (one
    pseudo-count of popularity); layers l < h have no earlier layer and use the layer's frequency."""

    name = "cooccurrence"
    mode = "layer_ahead"

    def __init__(self, num_experts: int, lookahead: int = 1):
        self.num_experts = num_experts
        self.lookahead = check_lookahead(lookahead)

    def fit(self, data: TraceSet | Iterable[TraceRecord]) -> CoOccurrenceScorer:
        h, n, freq, counts = self.lookahead, 0, 0, 0  # counted a chunk of rows at a time (predictor/chunks.py)
        for chunk in row_chunks(data):
            n, k = n + len(chunk.tokens), chunk.experts.shape[-1]
            freq = freq + layer_counts(chunk.experts, self.num_experts)
            counts = counts + cooccurrence_counts(chunk.experts, self.num_experts, h)  # [l - h, i, j]
        if not n:
            raise ValueError("cannot fit the co-occurrence scorer on zero sequences")
        self.freq = (freq / n).astype(np.float32)  # (L, E), = routing_stats.layer_frequency
        seen = counts.sum(-1, keepdims=True) / k  # tokens routed to i at layer l - h
        self.cond = ((counts + self.freq[h:, None, :]) / (seen + 1.0)).astype(np.float32)
        return self

    def scores(self, record: TraceRecord) -> np.ndarray:
        experts = np.asarray(record.experts, dtype=np.int64)
        T, L, _ = experts.shape
        if L != len(self.freq):
            raise ValueError(f"record has {L} MoE layers, the scorer was fitted on {len(self.freq)}")
        h, n = self.lookahead, max(L - self.lookahead, 0)
        out = np.broadcast_to(self.freq, (T, L, self.num_experts)).copy()
        out[:, h:] = self.cond[np.arange(n)[None, :, None], experts[:, :n]].mean(2)
        return out


class GateAheadScorer:
    """The cross-layer gate's picks recorded with the trace (`gate_ahead` column; collect.py
    record_gate_ahead=B): MoE layer l's router on the hidden state leaving the decoder layer before it,
    so known once layer l - 1 has run (mode layer_output), later than a layer_ahead h = 1 prediction,
    which needs only its routing. Training-free, as Fate runs it; `fit` only
    calibrates, per layer and rank, how often the pick at that rank is routed on the train rows, and an
    expert outside the B picks gets the layer's leftover rate (k - those) / (E - B). Scores are the odds
    p / (1 - p), so the evaluation's s / (1 + s) reads back p."""

    name = "gate_ahead"
    mode = "layer_output"
    scores_are_odds = True  # p / (1 - p): s / (1 + s) reads back p
    lookahead = None

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    @staticmethod
    def _picks(record: TraceRecord) -> np.ndarray:
        if record.gate_ahead is None:
            raise ValueError(f"prompt_id={record.prompt_id}: the gate_ahead scorer needs traces recorded with the "
                             "cross-layer gate's picks (collect.py record_gate_ahead=B; trace meta gate_ahead = 0)")
        return np.asarray(record.gate_ahead, dtype=np.int64)

    def fit(self, data: TraceSet | Iterable[TraceRecord]) -> GateAheadScorer:
        hits, n = 0, 0
        for rec in data:
            g, ex = self._picks(rec), np.asarray(rec.experts, dtype=np.int64)
            hits = hits + (g[..., :, None] == ex[..., None, :]).any(-1).sum(0)  # (L, B): routed pick at rank b
            n, k = n + len(g), ex.shape[-1]
        if not n:
            raise ValueError("cannot fit the gate_ahead scorer on zero sequences")
        p = np.clip(hits / n, 1e-4, 1 - 1e-4)  # (L, B)
        B = p.shape[1]
        rest = np.clip((k - p.sum(1)) / max(self.num_experts - B, 1), 1e-4, 1 - 1e-4)  # (L,)
        self.p, self.rest = p, rest
        return self

    def scores(self, record: TraceRecord) -> np.ndarray:
        g = self._picks(record)
        T, L, B = g.shape
        if (L, B) != self.p.shape:
            raise ValueError(f"prompt_id={record.prompt_id}: gate_ahead picks (L, B) = {(L, B)}, the scorer was "
                             f"fitted on {self.p.shape}")
        p = np.broadcast_to(self.rest[None, :, None], (T, L, self.num_experts)).copy()
        np.put_along_axis(p, g, np.broadcast_to(self.p, (T, L, B)), axis=-1)
        return p / (1.0 - p)


class OracleScorer:
    """The true routed experts, known a whole token ahead: a ceiling for any predictor (not a baseline)."""

    name = "oracle"
    mode = "token_ahead"
    lookahead = None
    scores_are_probs = True  # its 0 / 1 are the probabilities, exactly

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def fit(self, data) -> OracleScorer:
        return self

    def scores(self, record: TraceRecord) -> np.ndarray:
        return multi_hot(record.experts, self.num_experts)
