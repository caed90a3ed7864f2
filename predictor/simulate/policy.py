"""Scheduling policies: which expert to evict, which prefetch to admit, when to compute on the CPU.

One `Policy` names the rules; the decision functions below are compiled (numba) and pure, so the
simulator's replay engine and the runtime call the same code. The rules:

* eviction (`evict`): `lru`, `lfu`, `belady` (true next use: the offline optimum) or `learned`, a
  learned Belady: evict the resident expert with the farthest *expected* next use, from the
  predictor's probability for the next run of its layer where one is known (the current token's
  layers in token_ahead mode, layer l + h in layer_ahead mode) and otherwise from its reuse
  hazard, learned from the train split's traces (`reuse_hazard`): the chance that an expert of
  its layer last used n tokens ago is used by the next token, scaled by how often this expert is
  used against the rest of its layer;
* admission (`admit`): `all` (every predicted expert, the naive prefetcher) or `value`: a copy is
  committed only when its expected stall saved beats what it costs: probability x the part of a
  copy it can hide before its layer runs, against the chance the expert it evicts is needed within
  the next token and, weighted by `link_weight`, the link time a wrong guess wastes (with
  `link_load`, that weight times the link's measured load: a wrong copy delays others only as often
  as they need the link while it holds it);
* hybrid (`hybrid`): a miss runs on the host CPU when that finishes before its copy would land.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

LRU, LFU, BELADY, LEARNED = 0, 1, 2, 3
EVICTIONS = {"lru": LRU, "lfu": LFU, "belady": BELADY, "learned": LEARNED}
ALL, VALUE = 0, 1
ADMISSIONS = {"all": ALL, "value": VALUE}


@nb.njit(cache=True)
def expected_distance(key_layer, layer, r, L, krow_key, kp_key, lknown_l, lfloor_l, q, qmin):
    """Expected rows until an expert of `key_layer` is next used, seen from row `r` at `layer`.

    Its layer next runs d0 rows ahead (a whole token when it is the running layer). If a prediction
    for that run is known, the expert is used there with its predicted probability (or, outside the
    predicted list, the layer's floor: the routed experts the list is not expected to hold, spread over
    the unlisted ones), else with its usage rate `q` per token; each later
    token uses it with probability q, so the expected wait after a miss there is L (1 - p) / q.
    """
    d0 = key_layer - layer
    if d0 <= 0:
        d0 += L
    target = r + d0
    if krow_key == target:
        p = kp_key
    elif lknown_l == target:
        p = lfloor_l
    else:
        p = q
    return d0 + L * (1.0 - p) / max(q, qmin)


@nb.njit(cache=True, inline="always")
def hazard_rate(hazard, key, kl, E, gap):
    """The usage rate per token of `key` (of layer `kl`) `gap` tokens after its last use (0: not used
    yet), from the packed reuse hazard (ReuseHazard.packed, (L, E + G): the layer's expert factors, then
    its rates per gap, the last pooling every longer one): rate x factor, at most 1."""
    return min(1.0, hazard[kl, key - kl * E] * hazard[kl, E + min(gap, hazard.shape[1] - E - 1)])


@nb.njit(cache=True, _nrt=False)
def learned_score(key, kl, layer, r, L, E, last_tok, tok, tok0, krow_key, kp_key, lknown_l, lfloor_l, hazard, qmin):
    """The learned eviction's score of `key` (of layer `kl`) seen from row `r` at `layer` (higher:
    evicted first): its `expected_distance`, with the usage rate `hazard_rate` gives for the tokens
    between its last use (`last_tok`; before the sequence's first token `tok0`: not used yet) and its
    layer's next run, this token's when that layer is still to run (`tok`), else the next one's."""
    gap = 0 if last_tok < tok0 else (tok + 1 if kl <= layer else tok) - last_tok
    q = hazard_rate(hazard, key, kl, E, gap)
    return expected_distance(kl, layer, r, L, krow_key, kp_key, lknown_l, lfloor_l, q, qmin)


@nb.njit(cache=True)
def learned_ranking(resident, lo, hi, r, layer, L, E, tok, tok0, last_tok, stamp, krow, kp, lknown, lfloor, hazard, qmin,
                    out):
    """The runtime's learned eviction over keys [lo, hi) (layer * E + expert): the resident ones with the
    highest `learned_score`, ties by the oldest `stamp` (least recently used), best first, as the replay
    engine ranks the slots it rates (evict._rated_victim), into `out` (M,); returns how many (<= M). It
    rates every key; the engine rates a sampled window of Policy.sample slots in larger groups."""
    M = out.shape[0]
    score_of = np.empty(M)
    age_of = np.empty(M)
    n = 0
    for key in range(lo, hi):
        if not resident[key]:
            continue
        kl = key // E
        score = learned_score(key, kl, layer, r, L, E, last_tok[key], tok, tok0, krow[key], kp[key], lknown[kl],
                              lfloor[kl], hazard, qmin)  # fmt: skip
        age = -stamp[key]
        if not (score > -np.inf):  # NaN: never a victim, as in the engine
            continue
        if n == M and not (score > score_of[M - 1] or (score == score_of[M - 1] and age > age_of[M - 1])):
            continue
        j = min(n, M - 1)  # its place: after every key met before it that is not worse
        while j > 0 and (score > score_of[j - 1] or (score == score_of[j - 1] and age > age_of[j - 1])):
            out[j], score_of[j], age_of[j] = out[j - 1], score_of[j - 1], age_of[j - 1]
            j -= 1
        out[j], score_of[j], age_of[j] = key, score, age
        n = min(n + 1, M)
    return n


@nb.njit(cache=True)
def prefetch_value(p, p_victim, link_weight, land_s, deadline_s, copy_s):
    """Expected stall saved by a prefetch, in units of one copy, minus its costs.

    A copy that lands by `deadline_s` (its layer's start) hides a whole demand copy; one that lands
    later hides what is left; p_victim is the chance the evicted expert is needed within a token
    (then it costs a copy back), and a wrong guess (1 - p) wastes the link for one copy.
    """
    if copy_s <= 0.0:
        hidden = 1.0
    else:
        hidden = min(1.0, max(0.0, (deadline_s + copy_s - land_s) / copy_s))
    return p * hidden - p_victim - link_weight * (1.0 - p)


@nb.njit(cache=True)
def cpu_is_faster(copy_land_s, cpu_done_s):
    """Hybrid execution: run the miss on the CPU when it is done before its copy would land."""
    return cpu_done_s < copy_land_s


@dataclass(frozen=True)
class Policy:
    """A scheduling policy by name. `link_weight` is the admission's cost of a wrong prefetch (in
    copies); `qmin` floors the learned eviction's usage rate; `max_inflight`, where the time model
    commits prefetches from the host (sim.max_inflight set), caps them lower, so demand misses wait
    behind few."""

    evict: str = "lru"
    admit: str = "all"
    hybrid: bool = False
    link_weight: float = 0.5
    qmin: float = 0.01
    max_inflight: int | None = None
    demand_first: bool = True
    bypass: bool = False  # belady / learned: do not cache a miss (expected to be) used later than the victim
    min_prob: float = 0.0  # prefetch only predictions at least this likely (the runtime's --threshold)
    # learned eviction: slots rated per eviction (a random window; all when fewer). 128: with the
    # per-expert hazard a wider window pays (docs/RESULTS.md, session 17); replays stay above 1 M accesses/s on one core
    sample: int = 128
    link_load: bool = False  # value admission: link_weight x the link's busy share over recent tokens

    def __post_init__(self):
        if self.evict not in EVICTIONS:
            raise ValueError(f"policy evict={self.evict!r}: choose from {sorted(EVICTIONS)}")
        if self.admit not in ADMISSIONS:
            raise ValueError(f"policy admit={self.admit!r}: choose from {sorted(ADMISSIONS)}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"policy min_prob must be in [0, 1), got {self.min_prob}")
        if self.link_load and self.admit != "value":
            raise ValueError(f"policy link_load weighs value admission; admit={self.admit!r} has no weight to scale")
        if not (0 <= self.link_weight < np.inf and 0 < self.qmin <= 1):  # also refuses NaN
            raise ValueError(f"policy link_weight must be >= 0 and finite, qmin in (0, 1], got {self}")
        if self.max_inflight is not None and (type(self.max_inflight) is not int or self.max_inflight < 1):
            raise ValueError(f"policy max_inflight must be an int >= 1, got {self.max_inflight!r}")
        if type(self.sample) is not int or self.sample < 1:
            raise ValueError(f"policy sample must be an int >= 1 (slots rated per eviction), got {self.sample!r}")


# the named policies the evaluation, the benchmark grid and the runtime choose from
POLICIES = {
    "lru": Policy("lru"),
    "lfu": Policy("lfu"),
    "belady": Policy("belady", bypass=True),
    "naive": Policy("lru", "all", demand_first=False),  # prefetch every prediction, prediction-aware LRU
    # demand first: at most 4 prefetch copies committed to the link, so a demand miss waits behind few
    # (4 beat 2 and 8 on the h100_replay and h200_replay presets with both predictors: docs/RESULTS.md)
    "scheduler": Policy("learned", "value", max_inflight=4),
    # the same, a wrong copy's cost following the link's load (docs/RESULTS.md: the link weight)
    "scheduler_load": Policy("learned", "value", max_inflight=4, link_weight=0.6, link_load=True),
    "hybrid": Policy("learned", "value", hybrid=True, max_inflight=4),
    "hybrid_lru": Policy("lru", hybrid=True),  # no predictor: misses on the CPU when that is sooner
}


def admission_threshold(policy: Policy) -> float:
    """Value admission as a probability cut, the form a runtime without a copy timeline applies: the
    least p whose prefetch, landing before its layer and evicting nothing needed within the token, has
    `prefetch_value` >= 0, i.e. p - link_weight (1 - p) >= 0 (the naive `all` admission: `min_prob`). A
    `link_load` policy's weight is taken at a busy link (load 1): the runtime measures no link load."""
    if ADMISSIONS[policy.admit] == ALL:
        return policy.min_prob
    w = policy.link_weight
    return max(policy.min_prob, w / (1.0 + w))


@nb.njit(cache=True)
def _hazard_counts(keys, seq_rows, L, E, max_gap):
    """Per key (layer * E + expert), for g >= 1: reused[key, g], its uses g tokens after its previous
    use in the sequence, and at_risk[key, g], the tokens it went g tokens unused since a use (and could
    be reused); the last column pools every longer gap, counting each token at risk there. g = 0: its
    first uses in a sequence, and the tokens it was at risk of one (up to that use, or the whole
    sequence)."""
    G = max_gap
    at_risk = np.zeros((L * E, G))
    reused = np.zeros((L * E, G))
    last = np.full(L * E, -1, np.int64)
    for si in range(len(seq_rows) - 1):
        r0, r1 = seq_rows[si], seq_rows[si + 1]
        T = (r1 - r0) // L
        last[:] = -1
        for r in range(r0, r1):
            t = (r - r0) // L
            for j in range(keys.shape[1]):
                key = keys[r, j]
                if last[key] >= 0:
                    gap = t - last[key]
                    reused[key, min(gap, G - 1)] += 1.0
                    _at_risk(at_risk, key, gap, G)
                else:
                    reused[key, 0] += 1.0
                    at_risk[key, 0] += t + 1
                last[key] = t
        for key in range(L * E):  # never used again: at risk from its last use to the sequence's end
            if last[key] >= 0:
                _at_risk(at_risk, key, T - 1 - last[key], G)
            else:
                at_risk[key, 0] += T
    return reused, at_risk


@nb.njit(cache=True)
def _at_risk(at_risk, key, gap, G):
    """A key at risk at gaps 1..gap: one token each, those past G - 2 pooled in the last column."""
    for g in range(1, min(gap, G - 2) + 1):
        at_risk[key, g] += 1.0
    if gap >= G - 1:
        at_risk[key, G - 1] += gap - (G - 2)


@dataclass(frozen=True)
class ReuseHazard:
    """The learned eviction's usage rate for what the predictor has not spoken about, fitted on the
    train split's traces: rate[l, g] (L, G), the chance an expert of layer l last used g tokens ago
    (and not since) is used by the next token (g = 0: not used yet in the sequence; the last column
    pools every longer gap), times factor[l, e] (L, E), expert e's
    proportional-hazards factor: its uses over those the layer's rate expects of it, so a popular
    expert and a rare one last used as long ago are not rated alike."""

    rate: np.ndarray
    factor: np.ndarray

    def packed(self) -> np.ndarray:
        """(L, E + G) float64, the replay's layout: each layer's factors, then its rates."""
        return np.ascontiguousarray(np.concatenate([self.factor, self.rate], axis=1), dtype=np.float64)

    @classmethod
    def of(cls, hazard: ReuseHazard | np.ndarray | None, L: int, E: int, k: int) -> ReuseHazard:
        """A checked hazard for (L, E, k): a ReuseHazard, a rate table (L, G >= 2) with every factor 1,
        or None, the mean rate k / E everywhere."""
        if hazard is None:
            hazard = np.full((L, 2), k / E)
        if not isinstance(hazard, ReuseHazard):
            hazard = cls(np.asarray(hazard, dtype=np.float64), np.ones((L, E)))
        rate, factor = np.asarray(hazard.rate, np.float64), np.asarray(hazard.factor, np.float64)
        if rate.ndim != 2 or rate.shape[0] != L or rate.shape[1] < 2:
            raise ValueError(f"hazard rate must be (L={L}, gaps >= 2), got {rate.shape}")
        if factor.shape != (L, E) or not (factor > 0).all():
            raise ValueError(f"hazard factor must be (L={L}, E={E}) and positive, got {factor.shape}")
        return cls(rate, factor)


HAZARD_PRIOR = 2.0  # the factor's pseudo-uses, expected and seen: a rarely seen expert stays near 1
HAZARD_CLIP = (0.05, 20.0)


def reuse_hazard(acc, max_gap: int = 64) -> ReuseHazard:
    """The reuse hazard learned from traces (`ReuseHazard`): the learned eviction's usage rate for
    everything the predictor has not spoken about."""
    return hazard_from_counts(*hazard_counts(acc, max_gap), acc.num_experts, acc.top_k)


def hazard_counts(acc, max_gap: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(reused, at_risk) (L * E, max_gap) of `reuse_hazard`: sums over sequences, so the counts of
    replays of disjoint sets of sequences add up (the evaluation streams the train split,
    predictor/evaluation_rows.py)."""
    if max_gap < 2:
        raise ValueError(f"the reuse hazard needs max_gap >= 2 (first uses, then gaps of 1 token or more), got {max_gap}")
    seq_rows = np.concatenate([[0], np.cumsum(acc.seq_tokens) * acc.num_layers]).astype(np.int64)
    return _hazard_counts(np.asarray(acc.keys, np.int64), seq_rows, acc.num_layers, acc.num_experts, max_gap)


def hazard_from_counts(reused: np.ndarray, at_risk: np.ndarray, num_experts: int, top_k: int) -> ReuseHazard:
    """`reuse_hazard` from its counts: each layer's rate per gap, first uses included, from its
    experts' counts together (one pseudo-use at the mean rate k / E), then each expert's factor,
    (seen + prior) / (expected + prior) uses over every gap it was at risk at, clipped to HAZARD_CLIP."""
    E = num_experts
    if reused.shape != at_risk.shape or reused.ndim != 2 or reused.shape[0] % E:
        raise ValueError(f"hazard counts must both be (L * E, gaps) with E={E}, got {reused.shape} and {at_risk.shape}")
    L = reused.shape[0] // E
    layer_reused = reused.reshape(L, E, -1).sum(1)
    layer_at_risk = at_risk.reshape(L, E, -1).sum(1)
    rate = (layer_reused + 1.0) / (layer_at_risk + E / top_k)
    expected = (at_risk.reshape(L, E, -1) * rate[:, None, :]).sum(2)
    seen = reused.reshape(L, E, -1).sum(2)
    factor = np.clip((seen + HAZARD_PRIOR) / (expected + HAZARD_PRIOR), *HAZARD_CLIP)
    return ReuseHazard(rate, factor)
