"""GPU slot pool: a fixed number of expert-sized slots, a (layer, expert) -> slot map, eviction policies.

The pool owns one device buffer of shape [num_slots, slot_bytes], allocated once; nothing is
allocated on the hot path. Slots are global (any layer may use any slot) or split evenly per
layer. Keys are (moe_layer, expert).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Container, Iterable

import torch

from integrate.runtime.expected_use import ExpectedUse

Key = tuple[int, int]


def _shielded(key: Key, protected: tuple[Container[Key], ...]) -> bool:
    return any(key in p for p in protected)


class LRU:
    """Evict the least recently used resident expert."""

    def __init__(self):
        self.order: OrderedDict[Key, None] = OrderedDict()

    def inserted(self, key: Key) -> None:
        self.order[key] = None

    def used(self, key: Key) -> None:
        self.order.move_to_end(key)

    def evicted(self, key: Key) -> None:
        del self.order[key]

    def victim(self, protected: tuple[Container[Key], ...], predicted: Container[Key]) -> Key | None:
        return next((k for k in self.order if not _shielded(k, protected)), None)


class LFU(LRU):
    """Evict the resident expert routed least often so far (counts survive eviction); ties by LRU."""

    def __init__(self):
        super().__init__()
        self.freq: Counter[Key] = Counter()

    def used(self, key: Key) -> None:
        super().used(key)
        self.freq[key] += 1

    def victim(self, protected, predicted) -> Key | None:
        # iterating in LRU order makes min() pick the least recent among equal counts
        candidates = (k for k in self.order if not _shielded(k, protected))
        return min(candidates, key=self.freq.__getitem__, default=None)


class PredictionAware(LRU):
    """LRU that evicts experts outside the latest predictions first (predictions come from the prefetcher)."""

    def victim(self, protected, predicted) -> Key | None:
        cold = next((k for k in self.order if k not in predicted and not _shielded(k, protected)), None)
        return cold if cold is not None else super().victim(protected, predicted)


class Learned:
    """The learned Belady: evict the resident expert of its key range with the farthest expected next
    use (integrate/runtime/expected_use.py, the simulator's score), shared by every group of the pool."""

    def __init__(self, expected: ExpectedUse, keys: range):
        self.expected, self.keys = expected, keys

    def inserted(self, key: Key) -> None:
        self.expected.inserted(key)

    def used(self, key: Key) -> None:
        self.expected.used(key)

    def evicted(self, key: Key) -> None:
        self.expected.evicted(key)

    def victim(self, protected, predicted) -> Key | None:
        return self.expected.victim(self.keys, protected)


POLICIES = {"lru": LRU, "lfu": LFU, "predictor": PredictionAware, "learned": Learned}


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown eviction policy {policy!r}; choose from {sorted(POLICIES)}")


class SlotPool:
    def __init__(
        self,
        num_slots: int,
        slot_bytes: int,
        device: torch.device | str,
        policy: str = "lru",
        num_layers: int | None = None,
        expected: ExpectedUse | None = None,
    ):
        """`num_layers` given: slots are split evenly per layer (num_slots must divide), else global.
        `expected`: what the learned eviction (policy "learned") rates experts by."""
        check_policy(policy)
        if (policy == "learned") != (expected is not None):
            raise ValueError(f"eviction policy {policy!r}: an ExpectedUse is needed by 'learned' and only by it")
        groups = num_layers or 1
        if num_slots < groups or num_slots % groups:
            raise ValueError(f"{num_slots} slots cannot be split evenly over {groups} layer group(s)")
        self.per_layer = num_layers is not None
        self.num_slots = num_slots
        self.buffer = torch.empty(num_slots, slot_bytes, dtype=torch.uint8, device=device)
        per = num_slots // groups
        self.free = [list(range(g * per, (g + 1) * per))[::-1] for g in range(groups)]
        self.expected = expected
        if expected is None:
            self.policy = [POLICIES[policy]() for _ in range(groups)]
        else:  # a group's keys: one layer's, or all
            E = expected.E
            self.policy = [Learned(expected, range(g * E, (g + 1) * E) if num_layers else range(expected.L * E))
                           for g in range(groups)]  # fmt: skip
        self.slot_of: dict[Key, int] = {}
        self.predicted: set[Key] = set()  # latest predictions, minus the layers that have run since

    def group(self, key: Key) -> int:
        return key[0] if self.per_layer else 0

    @property
    def group_size(self) -> int:
        """Slots a layer can use at once (all of them, or its share when split per layer)."""
        return self.num_slots // len(self.free)

    def lookup(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def used(self, key: Key) -> None:
        self.policy[self.group(key)].used(key)

    def predict(self, keys: Iterable[Key], replace: bool = False) -> None:
        """Add (or with `replace`, set) the experts expected next: a prefetch never evicts them, whatever the
        policy (as in the simulator), and the prediction-aware policies evict them last on demand too."""
        if replace:
            self.predicted = set()
        self.predicted.update(keys)

    def used_on_host(self, key: Key) -> None:
        """`key` ran on the host CPU (hybrid): the learned eviction counts it as a use."""
        if self.expected is not None:
            self.expected.used_on_host(key)

    def learn(self, layer: int, experts: Iterable[int], probs: Iterable[float]) -> None:
        """A predictor's picks for `layer` in this step and their probabilities (the learned eviction's)."""
        if self.expected is not None:
            self.expected.learn(layer, experts, probs)

    def layer_done(self, layer: int) -> None:
        """The layer has run: its predictions are spent and no longer shield its experts."""
        if self.predicted:
            self.predicted = {k for k in self.predicted if k[0] != layer}
        if self.expected is not None:
            self.expected.layer_done(layer)

    def step_done(self) -> None:
        """A forward step has run (the learned eviction's clock: one token per sequence)."""
        if self.expected is not None:
            self.expected.step_done()

    def new_sequence(self) -> None:
        """New sequences start with the next step."""
        if self.expected is not None:
            self.expected.new_sequence()

    def allocate(self, key: Key, *protected: Container[Key]) -> tuple[int, Key | None] | None:
        """A slot for `key`: a free one, else the policy's victim outside every `protected` container.

        Returns (slot, evicted key or None), or None when every slot of the group is protected.
        """
        g = self.group(key)
        evicted = None
        if self.free[g]:
            slot = self.free[g].pop()
        else:
            pol = self.policy[g]
            evicted = pol.victim(protected, self.predicted)
            if evicted is None:
                return None
            pol.evicted(evicted)
            slot = self.slot_of.pop(evicted)
        self.slot_of[key] = slot
        self.policy[g].inserted(key)
        return slot, evicted
