"""TraceDataModule: prompt-level split, windows with context, padding masks."""

import numpy as np
import pytest
import torch
from synthetic import random_traces

from predictor.batching import TokenBudgetBatchSampler
from predictor.data import TraceDataModule, make_windows

L, E, K, V = 3, 8, 2, 30


def synthetic_traces(path, n_prompts=20, rows_per_prompt=2, seed=0, max_len=40):
    return random_traces(path, num_layers=L, num_experts=E, top_k=K, vocab_size=V, n_prompts=n_prompts,
                         rows_per_prompt=rows_per_prompt, lengths=(1, max_len), seed=seed)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return synthetic_traces(tmp_path_factory.mktemp("traces") / "t")


def test_windows_score_every_token_once():
    lengths = np.array([5, 10, 23, 1])
    w = make_windows(lengths, np.arange(4), window=8, context=3)
    scored = {}
    for row, start, length, first in w:
        assert 0 < length <= 8 and start + length <= lengths[row]
        assert first == 0 if start == 0 else first == 3  # later windows re-read 3 context tokens
        for t in range(start + first, start + length):
            scored[(row, t)] = scored.get((row, t), 0) + 1
    assert scored == {(r, t): 1 for r in range(4) for t in range(lengths[r])}
    with pytest.raises(ValueError, match="'context'"):
        make_windows(lengths, np.arange(4), window=8, context=8)
    # no context: a later window's first scored token would be scored as a sequence start (no routing before it)
    assert make_windows(lengths, np.array([0, 3]), window=8, context=0).tolist() == [[0, 0, 5, 0], [3, 0, 1, 0]]
    with pytest.raises(ValueError, match="'context' = 0, but row 1 has 10 tokens, more than window = 8"):
        make_windows(lengths, np.arange(4), window=8, context=0)


def test_split_has_no_prompt_overlap_and_masks_padding(traces):
    dm = TraceDataModule(
        str(traces.path), window=16, context=4, batch_tokens=64, max_batch_size=8
    )
    assert dm.model_dims() == {"vocab_size": V, "num_layers": L, "num_experts": E, "top_k": K}
    dm.setup("fit")
    pids = traces.prompt_ids
    train, val = set(pids[dm.indices["train"]]), set(pids[dm.indices["val"]])
    assert train and val and not train & val
    assert len(dm.indices["train"]) + len(dm.indices["val"]) == len(traces)
    scored = 0
    for ids, experts, mask, sequences, pos in dm.val_dataloader():
        B, T = ids.shape
        assert experts.shape == (B, T, L, K) and mask.shape == (B, T) and B * T <= 64
        pad = ids < 0
        assert (experts[pad] == -1).all() and not mask[pad].any() and (pos[pad] == -1).all()
        assert (experts[~pad] >= 0).all()
        assert set(sequences.tolist()) <= val  # each window's prompt id, all held-out
        # positions are row positions; scored windows beyond the first start with 4 context tokens
        first = pos[:, 0]
        assert (mask[first > 0, :4] == False).all()  # noqa: E712
        scored += int(mask.sum())
    assert scored == int(traces.lengths[dm.indices["val"]].sum()) == dm.num_scored_tokens("val")


def test_batches_carry_row_positions_and_row_content(traces):
    dm = TraceDataModule(str(traces.path), window=1000, context=0, batch_tokens=1000, max_batch_size=1)
    dm.setup()
    loader = dm.val_dataloader()
    batch = next(iter(loader))
    assert len(batch) == 5
    ids, experts, mask, sequences, positions = batch
    row = dm.windows["val"][loader.batch_sampler.batches[0][0]][0]
    rec = traces.record(row)
    assert sequences.tolist() == [rec.prompt_id]
    assert positions[0, : rec.num_tokens].tolist() == list(range(rec.num_tokens))
    torch.testing.assert_close(ids[0, : rec.num_tokens], torch.from_numpy(rec.token_ids))
    torch.testing.assert_close(experts[0, : rec.num_tokens], torch.from_numpy(rec.experts))


def test_ranks_split_the_batches_and_each_needs_one(monkeypatch):
    lengths = np.full(6, 10)
    s = TokenBudgetBatchSampler(lengths, batch_tokens=20, max_batch_size=2, shuffle=True, seed=0)  # 3 batches
    monkeypatch.setattr(TokenBudgetBatchSampler, "_world", staticmethod(lambda: (1, 2)))
    assert len(s) == 1 and len(list(s)) == 1  # 3 batches, 2 ranks: the uneven one dropped
    monkeypatch.setattr(TokenBudgetBatchSampler, "_world", staticmethod(lambda: (3, 4)))
    with pytest.raises(ValueError, match="3 training batches for 4 ranks: every rank needs one"):
        list(s)  # rank 3 would have none and wait on the others' all-reduce for ever


def test_batch_sampler_shuffles_per_epoch_and_covers_all():
    lengths = np.random.default_rng(0).integers(1, 50, 200)
    s = TokenBudgetBatchSampler(lengths, batch_tokens=100, max_batch_size=16, shuffle=True, seed=0)
    a, b = list(s), list(s)
    assert sorted(i for x in a for i in x) == list(range(200)) == sorted(i for x in b for i in x)
    assert a != b and len(a) == len(s)
    assert all(max(lengths[x]) * len(x) <= 100 or len(x) == 1 for x in a)


def test_bad_split_name(traces):
    with pytest.raises(ValueError, match="'val_split'"):
        TraceDataModule(str(traces.path), val_split="valid")
    with pytest.raises(ValueError, match="val_split='train' must name different splits"):
        TraceDataModule(str(traces.path), val_split="train")  # checkpoints chosen on training prompts
    for key, bad in (("window", 16.5), ("context", 4.7), ("batch_tokens", 64.0), ("window", 0), ("context", -1)):
        with pytest.raises(ValueError, match=f"data: key '{key}' must be a .*int, got {bad!r}"):
            TraceDataModule(str(traces.path), **{"window": 16, "context": 4, "batch_tokens": 64, key: bad})
    dm = TraceDataModule(str(traces.path), split={"train": 0.79, "val": 0.2, "test": 0.01}, test_split="test")
    with pytest.raises(ValueError, match="leaves the 'test' split empty"):
        dm.setup()


def test_default_split_is_the_one_the_config_names():
    """conf/data/demo.yaml (read by training and evaluation) and DEFAULT_SPLIT (stats, demo report,
    replay benchmark, the DataModule's default) name the same split."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from predictor.splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED

    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "demo.yaml")
    assert dict(conf.split) == DEFAULT_SPLIT and conf.seed == DEFAULT_SPLIT_SEED
    dm = TraceDataModule("unused")
    assert dm.split == DEFAULT_SPLIT and dm.seed == DEFAULT_SPLIT_SEED


def _repeated_prompts(path, seed: int, prompt_len: int, tail: int = 0):
    """40 rows of 30 prompts: ids 30..39 repeat prompts 0..9 (with `tail` generated tokens each, which differ)."""
    from predictor.traces import TraceMeta, TraceRecord, write_traces

    rng = np.random.default_rng(seed)
    meta = TraceMeta(num_layers=2, moe_layers=[0, 1], num_experts=4, top_k=1, vocab_size=50,
                     source_model="synthetic", architecture="synthetic")  # fmt: skip
    prompts = [rng.integers(0, 50, prompt_len) for _ in range(30)]
    recs = []
    for i in range(40):
        tokens = np.concatenate([prompts[i % 30], rng.integers(0, 50, tail)])
        recs.append(TraceRecord(prompt_id=i, token_ids=tokens, experts=rng.integers(0, 4, (len(tokens), 2, 1)),
                                num_prefill=prompt_len))  # fmt: skip
    return write_traces(path, meta, recs)


def test_a_prompt_recorded_under_two_ids_never_straddles_the_split(tmp_path):
    """Rows whose prompts are the same tokens (one prompt recorded twice, under two ids or in two sets)
    share a `prompt_keys` key; a split with keys keeps train as it was and drops from val every row whose
    prompt train holds, so no held-out row is a copy of a trained one (found in Puffin: 40 of 400)."""
    from predictor.splits import DEFAULT_SPLIT, split_indices
    from predictor.trace_sets import load_trace_sets

    ts = _repeated_prompts(tmp_path / "a", 0, 6, tail=3)
    keys = ts.prompt_keys
    assert len(np.unique(keys)) == 30 and np.array_equal(keys[:10], keys[30:])
    plain = split_indices(ts.prompt_ids, DEFAULT_SPLIT, 0)
    kept = split_indices(ts.prompt_ids, DEFAULT_SPLIT, 0, keys=keys)
    np.testing.assert_array_equal(kept["train"], plain["train"])
    assert set(kept["val"]) < set(plain["val"]) and not set(keys[kept["val"]]) & set(keys[kept["train"]])
    # the same set read twice as one (its prompt ids shifted apart): the keys still find the copies
    both = load_trace_sets([tmp_path / "a", tmp_path / "a"])
    assert np.array_equal(both.prompt_keys, np.concatenate([keys, keys]))
    assert np.array_equal(ts.select([3, 1]).prompt_keys, keys[[3, 1]])
    dm = TraceDataModule(str(tmp_path / "a"), window=4, context=1, batch_tokens=64, max_batch_size=2)
    dm.setup()
    assert not set(keys[dm.indices["val"]]) & set(keys[dm.indices["train"]])


def test_shared_prefix_tokens_counts_the_opening_a_train_row_has(tmp_path):
    """Per held-out row, the longest prefix some train row starts with: the whole row for a copy, the
    shared opening for a prompt that starts like a trained one (its tail differs), 0 for none."""
    from predictor.splits import shared_prefix_tokens
    from predictor.traces import TraceMeta, TraceRecord, write_traces

    meta = TraceMeta(num_layers=1, moe_layers=[0], num_experts=4, top_k=1, vocab_size=50, source_model="synthetic",
                     architecture="synthetic")  # fmt: skip
    rows = [[1, 2, 3, 4], [1, 2, 3, 9, 9], [7, 8], [1, 2, 3, 4], [5, 6], [1, 2, 5]]
    ts = write_traces(tmp_path / "t", meta, [TraceRecord(prompt_id=i, token_ids=np.array(r), num_prefill=len(r),
                                                         experts=np.zeros((len(r), 1, 1), np.int64))
                                             for i, r in enumerate(rows)])  # fmt: skip
    train, held_out = ts.select([0, 2]), ts.select([3, 1, 4, 5])
    assert shared_prefix_tokens(held_out, train).tolist() == [4, 3, 0, 2]
    assert shared_prefix_tokens(ts, ts).tolist() == [len(r) for r in rows]


def test_held_out_check_goes_by_prompt_tokens(tmp_path):
    """A row whose prompt id the run never trained on, but whose prompt it did (a copy under another id),
    is refused as not held out."""
    from predictor.evaluation_rows import check_held_out
    from predictor.splits import DEFAULT_SPLIT, split_indices, trace_fingerprint

    ts = _repeated_prompts(tmp_path / "a", 1, 5)
    pmeta = {"split": DEFAULT_SPLIT, "split_seed": 0, "train_split": "train", "traces_fingerprint": trace_fingerprint(ts)}
    by_id = split_indices(ts.prompt_ids, DEFAULT_SPLIT, 0)
    keys = ts.prompt_keys
    copies = [r for r in by_id["val"] if keys[r] in set(keys[by_id["train"]])]
    assert copies  # val by id, trained by content
    with pytest.raises(ValueError, match=r"was trained on \d+ of the"):
        check_held_out(pmeta, ts, ts.select(copies), "the predictor")
    kept = split_indices(ts.prompt_ids, DEFAULT_SPLIT, 0, keys=keys)["val"]
    check_held_out(pmeta, ts, ts.select(kept), "the predictor")  # the split's own held-out rows pass


def test_the_routing_bank_keeps_every_copy_of_a_prompt_out_of_its_vote(tmp_path):
    """Two train rows of one prompt under two ids carry one label, so excluding a row's prompt from the
    bank's vote (exclude = its label) excludes its copy too: no exact answer leaks into training."""
    from predictor.splits import prompt_groups

    assert prompt_groups(np.array([5, 2, 9, 7]), np.array([1, 1, 3, 1])) == {5: 2, 7: 2}
    _repeated_prompts(tmp_path / "a", 2, 6)
    dm = TraceDataModule(str(tmp_path / "a"), window=8, context=1, batch_tokens=64, max_batch_size=2)
    dm.setup()
    labels = dm.routing_rows("train")[2]
    assert not set(labels.tolist()) & set(range(30, 40))  # copies carry their prompt's first id
    seen = {int(b[3][i]) for b in dm.train_dataloader() for i in range(len(b[3]))}
    assert seen <= set(range(30)) and seen


def test_prompt_groups_join_ids_through_any_shared_prompt_and_a_resumed_bank_is_relabelled():
    """Id 7 has rows of two prompts, one shared with id 5, the other with id 3: all three are one group,
    named 3. A checkpoint's bank labelled with raw ids takes the loader's labels when it is loaded."""
    from types import SimpleNamespace

    from predictor.lit_module import PredictorLitModule
    from predictor.splits import prompt_groups

    assert prompt_groups(np.array([7, 5, 7, 3, 9]), np.array([10, 10, 20, 20, 30])) == {5: 3, 7: 3}
    from functools import partial

    from synthetic import tiny_predictor

    module = PredictorLitModule(tiny_predictor(vocab_size=20, num_layers=2, num_experts=4, top_k=1).config.to_dict(),
                                partial(torch.optim.AdamW, lr=1e-3))  # fmt: skip
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(groups={5: 3, 7: 3}))
    ckpt = {"state_dict": {"net.bank.sequences": torch.tensor([3, 5, 7, 9]), "net.other": torch.tensor([5])}}
    module.on_load_checkpoint(ckpt)
    assert ckpt["state_dict"]["net.bank.sequences"].tolist() == [3, 3, 3, 9]
    assert ckpt["state_dict"]["net.other"].tolist() == [5]
