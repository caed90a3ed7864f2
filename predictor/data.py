"""LightningDataModule over a trace set (predictor.traces): prompt-level split, windows (windows.py), batches.

Batches. Windows are sorted by length and packed greedily into batches of at most `batch_tokens`
padded tokens (and `max_batch_size` windows), so short prompts are not padded to `window`. The
batches are fixed once; each training epoch shuffles their order (seeded, the same on every rank).
Under DDP each rank takes every world_size-th batch (set `use_distributed_sampler: false`, as
`conf/trainer/ddp.yaml` does); the sampler: batching.py. What a batch holds: windows.py (`Collate`).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from predictor.batching import TokenBudgetBatchSampler
from predictor.hub_traces import is_hub_uri, resolve_trace_path
from predictor.resume import ResumableDataLoader
from predictor.splits import (
    DEFAULT_SPLIT,
    DEFAULT_SPLIT_SEED,
    check_fractions,
    prompt_groups,
    trace_fingerprint,
    training_splits,
)
from predictor.trace_sets import check_compatible, load_trace_sets, merged_meta
from predictor.traces import META_FILE, TraceMeta, TraceSet, read_meta_file
from predictor.windows import Collate, WindowDataset, make_windows  # noqa: F401  (tests import make_windows here)


def read_meta(path: str | Path) -> TraceMeta:
    return read_meta_file(Path(path) / META_FILE)


class TraceDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | list[str],
        window: int = 256,
        context: int = 64,
        split: dict | None = None,
        seed: int = DEFAULT_SPLIT_SEED,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        calib_fraction: float = 0.0,
        batch_tokens: int = 8192,
        max_batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_rows: int | None = None,
        unk_rate: float = 0.0,
        gate_inputs: int = 0,
    ):
        super().__init__()
        # several trace sets train as one (predictor/trace_sets.py); self.path is the first
        given = [str(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
        self.paths = [resolve_trace_path(p) for p in given]  # hf://datasets/... -> its HF cache snapshot
        self.sources = [g if is_hub_uri(g) else str(p) for p, g in zip(self.paths, given)]
        if not self.paths:
            raise ValueError("data: key 'path' is an empty list")
        self.path = self.paths[0]
        if not 0.0 <= unk_rate < 1.0:
            raise ValueError(f"data: key 'unk_rate' must lie in [0, 1), got {unk_rate}")
        self.unk_rate = unk_rate
        self.split = dict(split or DEFAULT_SPLIT)
        if isinstance(calib_fraction, bool) or not isinstance(calib_fraction, (int, float)) or not 0 <= calib_fraction < 1:
            raise ValueError(f"data: key 'calib_fraction' must lie in [0, 1), got {calib_fraction!r}")
        # > 0: prompts of the train split's share kept apart, the predictor's probabilities calibrated on them
        self.calib_fraction = float(calib_fraction)
        self.calib_split = "calib" if calib_fraction else None
        self.seed = seed
        self.window, self.context = window, context
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        roles = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
        for key, name in roles.items():
            if name is not None and name not in self.split:
                raise ValueError(
                    f"data: key '{key}' = {name!r} is not one of the split names {list(self.split)}"
                )
        named = [name for name in roles.values() if name is not None]
        if len(set(named)) < len(named):  # e.g. val_split=train: checkpoints chosen on training prompts
            raise ValueError(f"data: keys {', '.join(f'{k}={v!r}' for k, v in roles.items() if v is not None)} must "
                             "name different splits")
        counts = {"window": window, "context": context, "batch_tokens": batch_tokens, "max_batch_size": max_batch_size,
                  "max_rows": max_rows}  # ints (a window of 16.5 drops or repeats tokens); only context may be 0
        for key, value in counts.items():
            low = 0 if key == "context" else 1
            if not (value is None and key == "max_rows") and (type(value) is not int or value < low):
                raise ValueError(f"data: key '{key}' must be a {'non-negative' if low == 0 else 'positive'} int, "
                                 f"got {value!r}")
        if batch_tokens < window:
            raise ValueError(f"data: key 'batch_tokens' = {batch_tokens} must be >= window = {window}")
        try:
            check_fractions(self.split)
        except ValueError as e:
            raise ValueError(f"data: key 'split': {e}") from None
        self.batch_tokens, self.max_batch_size = batch_tokens, max_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.gate_inputs = gate_inputs  # a predictor reading the cross-layer gate's picks (train() sets it)
        self.max_rows = max_rows
        self.traces: TraceSet | None = None
        self.indices: dict[str, np.ndarray] = {}
        self.windows: dict[str, np.ndarray] = {}
        self.groups: dict[int, int] = {}  # prompt id -> its prompt's smallest id, for copies (setup)
        self._meta: TraceMeta | None = None
        self._vocab_size: int | None = None

    # ------------------------------------------------------------ what the model needs to know

    @property
    def meta(self) -> TraceMeta:
        if self._meta is None:
            for path in self.paths:
                if not (path / META_FILE).exists():
                    raise FileNotFoundError(
                        f"no trace set at {path} (missing {META_FILE}); set data.path, "
                        "or build the demo traces / import the Puffin traces first"
                    )
            metas = [read_meta(p) for p in self.paths]
            check_compatible(metas, self.paths)  # same (L, E, k) and token space, or a clear error
            self._meta = merged_meta(metas)
        return self._meta

    @property
    def vocab_size(self) -> int:
        if self._vocab_size is None:
            if self.meta.vocab_size is not None:
                self._vocab_size = int(self.meta.vocab_size)
            else:  # no declared vocab: the largest id present (Arrow compute, no row decoding)
                import pyarrow.compute as pc

                col = self._load().dataset.data.column("token_ids")
                self._vocab_size = int(pc.max(pc.list_flatten(col)).as_py()) + 1
        return self._vocab_size

    def model_dims(self) -> dict:
        """The PredictorConfig fields that come from the data."""
        m = self.meta
        return {
            "vocab_size": self.vocab_size,
            "num_layers": m.num_moe_layers,
            "num_experts": m.num_experts,
            "top_k": m.top_k,
        }

    def checkpoint_meta(self) -> dict:
        """What every checkpoint holds (`describe`) and the batching a resumed run must keep for its saved
        loader position to mean the same batches (resume.check_resume)."""
        return {**self.describe(), "window": self.window, "context": self.context, "batch_tokens": self.batch_tokens,
                "max_batch_size": self.max_batch_size}

    def describe(self) -> dict:
        """Trace meta for the exported predictor file."""
        m = self.meta
        return {
            "source_model": m.source_model,
            "architecture": m.architecture,
            "moe_layers": list(m.moe_layers),
            "num_experts": m.num_experts,
            "top_k": m.top_k,
            "vocab_size": self.vocab_size,
            "tokenizer": m.tokenizer,
            "vocab_file": m.vocab_file,
            "token_space": m.token_space,
            "unk_token_id": m.unk_token_id,
            "traces": self.sources[0] if len(self.sources) == 1 else self.sources,  # a Hub name as given
            "val_split": self.val_split,
            "train_split": self.train_split,
            "calib_fraction": self.calib_fraction,
            "split": self.split,
            "split_seed": self.seed,
            "max_rows": self.max_rows,
            "traces_fingerprint": trace_fingerprint(self._load()),  # what evaluation knows the set by
            "traces_members": self._members(),
            "expert_shape": m.expert_shape,
        }

    # ------------------------------------------------------------ setup and loaders

    def _members(self) -> list[dict] | None:
        """Several sets read as one: each one's fingerprint and rows, so evaluation on one of them alone
        knows which of its prompts the run trained on (evaluation_rows.check_held_out)."""
        if len(self.paths) == 1:
            return None
        sets = [load_trace_sets([p]) for p in self.paths]
        return [{"fingerprint": trace_fingerprint(ts), "rows": len(ts)} for ts in sets]

    def _load(self) -> TraceSet:
        if self.traces is None:
            self.meta  # noqa: B018 - a clear error when the path is wrong
            self.traces = load_trace_sets(self.paths)
        return self.traces

    def setup(self, stage: str | None = None) -> None:
        if self.windows:
            return
        ts = self._load()
        prompt_ids, keys = ts.prompt_ids, ts.prompt_keys  # keys: a prompt recorded twice stays on one side
        lengths = ts.lengths
        if self.max_rows is not None:
            prompt_ids, keys, lengths = prompt_ids[: self.max_rows], keys[: self.max_rows], lengths[: self.max_rows]
        try:
            self.indices = training_splits(prompt_ids, self.split, self.seed, self.train_split, self.calib_fraction,
                                           keys)  # fmt: skip
        except ValueError as e:  # the carving (the fractions were checked in __init__)
            raise ValueError(f"data: key 'calib_fraction' = {self.calib_fraction}: {e}") from None
        for name in (self.train_split, self.val_split, self.test_split, self.calib_split):
            if name is not None and not len(self.indices[name]):
                raise ValueError(
                    f"data: key 'split' = {self.split} leaves the {name!r} split empty "
                    f"({len(np.unique(prompt_ids))} prompts in {self.path}); give it a larger fraction"
                )
        for name, rows in self.indices.items():
            self.windows[name] = make_windows(lengths, rows, self.window, self.context)
        self.groups = prompt_groups(prompt_ids, keys)  # a prompt's copies under other ids: out of its bank vote

    def routing_rows(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every token of a split: token ids (N,), experts (N, L, k), prompt ids (N,) (for a routing bank; a
        copy of a prompt under another id is labelled with the smallest id of its prompt, `groups`)."""
        from predictor.baselines import stack_rows

        if not self.windows:
            self.setup()
        rows = self.indices[split]
        ts = self._load()
        tokens, experts, lengths = stack_rows(ts.select(rows))
        ids = np.asarray([self.groups.get(int(p), int(p)) for p in ts.prompt_ids[rows]], dtype=np.int64)
        return tokens, experts, np.repeat(ids, lengths)

    def reuse_hazard(self):
        """The learned eviction's reuse hazard (predictor.simulate.policy.ReuseHazard) of the train split,
        shipped in the predictor file for the runtime."""
        from predictor.evaluation_rows import train_replay_stats

        if not self.windows:
            self.setup()
        return train_replay_stats(self._load().select(self.indices[self.train_split]))[1]

    def num_scored_tokens(self, split: str) -> int:
        w = self.windows[split]
        return int((w[:, 2] - w[:, 3]).sum())

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.windows:
            self.setup()
        w = self.windows[split]
        unk_id = self.meta.unk_token_id
        if self.unk_rate and unk_id is None:
            raise ValueError(f"data: key 'unk_rate' = {self.unk_rate} needs traces whose vocabulary has an "
                             f"<unk> id (a vocab.json import); {self.path} records no unk_token_id")
        unk = (unk_id, self.unk_rate, self.seed) if shuffle and self.unk_rate else None
        if self.gate_inputs > self.meta.gate_ahead:
            widths = {str(p): read_meta(p).gate_ahead for p in self.paths}  # sets of other widths: none kept
            raise ValueError(
                f"the predictor reads {self.gate_inputs} cross-layer gate picks per token and layer "
                f"(model.net.gate_inputs); the traces record {widths} (trace meta gate_ahead; sets loaded together "
                f"keep them only when all record the same number): record them with collect.py "
                f"record_gate_ahead={self.gate_inputs}"
            )
        ds = WindowDataset(self._load(), w, unk, self.gate_inputs, self.groups)
        sampler = TokenBudgetBatchSampler(
            w[:, 2],
            self.batch_tokens,
            self.max_batch_size,
            shuffle=shuffle,
            seed=self.seed,
            drop_uneven=shuffle,
        )
        # the train loader's position goes into checkpoints, so a resumed run continues its epoch
        return (ResumableDataLoader if shuffle else DataLoader)(
            ds,
            batch_sampler=sampler,
            collate_fn=Collate(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # its own generator: starting an epoch must not draw from the global RNG (dropout), or a resumed
            # run would draw differently from the run it resumes
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        # Trainer(overfit_batches=n) (debug=overfit) must see the same n batches every epoch: no reshuffle
        overfit = bool(getattr(self.trainer, "overfit_batches", 0))
        return self._loader(self.train_split, shuffle=not overfit)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, shuffle=False)

    def split_dataloader(self, name: str) -> DataLoader:
        """Every window of split `name`, in order (the calibration's prompts)."""
        if not self.windows:
            self.setup()
        return self._loader(name, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.test_split:
            raise ValueError("data: key 'test_split' is null: no split to test on")
        return self._loader(self.test_split, shuffle=False)
