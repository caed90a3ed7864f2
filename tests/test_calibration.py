"""Calibrated probabilities (predictor/calibration.py): the isotonic fit on histograms by hand, its
inverse for a probability cut, its expected calibration error against ExpertMetrics', and training
that fits it on a split of its own and ships it in the predictor file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from predictor.calibration import Calibration
from predictor.metrics import ExpertMetrics

CENTRES = np.array([0.125, 0.375, 0.625, 0.875])  # four equal-width bins of [0, 1]


def test_isotonic_fit_pools_the_bins_that_break_monotony():
    """Routed shares 0.1, 0.3, 0.2, 0.9 per bin: the middle two pool to (3 + 2) / 20 = 0.25, weighted
    by their cells; between knots the map is linear, outside them clipped."""
    cal = Calibration.fit([1, 3, 2, 9], [9, 7, 8, 1])
    assert cal(CENTRES) == pytest.approx([0.1, 0.25, 0.25, 0.9])
    assert cal(np.array([0.0, 0.25, 0.75, 1.0])) == pytest.approx([0.1, 0.175, 0.575, 0.9])
    t = torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=torch.float32)
    assert cal(t).dtype == torch.float32 and cal(t).tolist() == pytest.approx([0.1, 0.175, 0.575, 0.9])
    # the cut: the least sigmoid whose calibrated probability reaches it
    assert cal.min_raw(0.05) == 0.0 and cal.min_raw(0.95) == 2.0
    assert cal.min_raw(0.25) == pytest.approx(0.375)
    assert cal.min_raw(0.5) == pytest.approx(0.625 + 0.25 * 0.25 / 0.65)
    for t in (0.1, 0.2, 0.5, 0.9):
        assert cal(np.array(cal.min_raw(t))) == pytest.approx(t)


def test_ece_of_the_identity_is_the_metrics_ece_and_calibration_lowers_it():
    rng = np.random.default_rng(0)
    m = ExpertMetrics(2, 8, 2, pr_bins=100)
    p = rng.random(20_000)
    routed = rng.random(20_000) < np.clip(1.4 * p - 0.2, 0, 1)  # an underconfident-then-over predictor
    m.pos_hist += torch.from_numpy(np.histogram(p[routed], 100, (0, 1))[0]).double()
    m.neg_hist += torch.from_numpy(np.histogram(p[~routed], 100, (0, 1))[0]).double()
    identity = Calibration(np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    raw_ece = identity.ece(m.pos_hist.numpy(), m.neg_hist.numpy())
    assert raw_ece == pytest.approx(m._calibration()[1])
    cal = Calibration.fit(m.pos_hist, m.neg_hist)
    assert cal.ece(m.pos_hist.numpy(), m.neg_hist.numpy()) < 0.25 * raw_ece


def test_bad_knots_are_refused():
    with pytest.raises(ValueError, match="raw must increase"):
        Calibration(np.array([0.2, 0.1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Calibration(np.array([0.1, 0.2]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="fewer than two"):
        Calibration.fit([0, 3, 0], [0, 1, 0])


def test_the_calibration_prompts_come_from_the_train_split_and_val_keeps_its_own(tmp_path):
    from synthetic import random_traces

    from predictor.data import TraceDataModule

    path = random_traces(tmp_path / "t", num_layers=2, num_experts=8, top_k=2, vocab_size=30, n_prompts=40).path
    plain, carved = TraceDataModule(path), TraceDataModule(path, calib_fraction=0.1)
    plain.setup()
    carved.setup()
    assert carved.calib_split == "calib" and plain.calib_split is None and carved.split == plain.split
    np.testing.assert_array_equal(carved.indices["val"], plain.indices["val"])
    np.testing.assert_array_equal(np.sort(np.concatenate([carved.indices["train"], carved.indices["calib"]])),
                                  plain.indices["train"])  # fmt: skip
    assert len(np.unique(carved.traces.prompt_ids[carved.indices["calib"]])) == 4  # 0.1 of 40 prompts
    assert carved.describe()["calib_fraction"] == 0.1
    for bad in (-0.1, True, 1.0):
        with pytest.raises(ValueError, match="calib_fraction"):
            TraceDataModule(path, calib_fraction=bad)
    with pytest.raises(ValueError, match="must leave both non-empty"):
        TraceDataModule(path, calib_fraction=0.8).setup()


@pytest.mark.parametrize("n, fractions", [(15, {"train": 0.9, "val": 0.1}), (30, {"train": 0.85, "val": 0.15}),
                                          (35, {"train": 0.85, "val": 0.15}), (1999, {"train": 0.8, "val": 0.2})])
def test_carving_keeps_every_other_split_exactly(n, fractions):
    """Where cutting at train - c, then c, would round a boundary the other way (found by a review),
    carving takes the calibration prompts from the train share and leaves val as it was."""
    from predictor.splits import carve_split, split_indices

    ids = np.repeat(np.arange(n), 3)
    plain = split_indices(ids, fractions, 0)
    carved = carve_split(ids, fractions, 0, "train", "calib", 0.2 if n < 100 else 0.1)
    np.testing.assert_array_equal(carved["val"], plain["val"])
    assert set(carved["train"]) | set(carved["calib"]) == set(plain["train"])
    assert not set(carved["train"]) & set(carved["calib"])


def test_with_prompt_keys_training_and_evaluation_hold_out_the_same_rows():
    """Carving calib out of train leaves val as evaluation's `split_indices` has it, repeats dropped
    alike; no calib row repeats a train row's prompt."""
    from predictor.splits import DEFAULT_SPLIT, split_indices, training_splits

    rng = np.random.default_rng(0)
    ids, keys = np.arange(400), rng.integers(0, 300, 400)  # about a quarter of the prompts recorded twice
    trained = training_splits(ids, DEFAULT_SPLIT, 0, "train", 0.1, keys)
    np.testing.assert_array_equal(trained["val"], split_indices(ids, DEFAULT_SPLIT, 0, keys=keys)["val"])
    assert not set(keys[trained["calib"]]) & set(keys[trained["train"]])
    assert not set(keys[trained["val"]]) & set(keys[np.concatenate([trained["train"], trained["calib"]])])


def test_the_train_split_keeps_its_rows_whatever_the_order_of_the_fractions():
    from predictor.splits import split_indices, training_splits

    rng = np.random.default_rng(1)
    ids, keys = np.arange(300), rng.integers(0, 220, 300)
    for fractions in ({"train": 0.8, "val": 0.2}, {"val": 0.2, "train": 0.8}):
        plain = split_indices(ids, fractions, 0)
        kept = training_splits(ids, fractions, 0, "train", 0.0, keys)
        assert list(kept) == list(fractions)
        np.testing.assert_array_equal(kept["train"], plain["train"])
        assert not set(keys[kept["val"]]) & set(keys[kept["train"]])
        np.testing.assert_array_equal(kept["val"], split_indices(ids, fractions, 0, keys=keys)["val"])
