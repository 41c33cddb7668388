"""Model selection and the held-out split: the best epoch follows validation (test without a
validation split), best.pt is written only on an improvement, and the validation rows are
disjoint from training and the same for every seed."""

import json

import numpy as np
import pytest

import fastcifar.train as T
from fastcifar import checkpoint
from fastcifar.errors import BadInput
from helpers import QUIET, fit, fixed_scores, info, metrics, tiny


def test_selection_follows_validation_and_best_pt_only_on_improvement(store_dir, tmp_path):
    # val peaks at epoch 2 (epoch 4 only ties it: not an improvement); test peaks at epoch 4
    val, test = [10.0, 30.0, 20.0, 30.0], [11.0, 12.0, 13.0, 40.0]
    run = tmp_path / "run"
    # the scores are fixed, so the training is only a way through the loop: a fifth of the store
    s = fit(tiny(train__epochs=4, data__val_split=0.2, data__subset=0.2), info(), out=run, data_dir=store_dir,
            setup=fixed_scores(val, test))
    assert [m["val_acc"] for m in metrics(run)] == val and [m["test_acc"] for m in metrics(run)] == test
    assert s["selection"] == "val" and s["best_epoch"] == s["best_val_epoch"] == 2
    assert s["best_val_acc"] == 30.0 and s["best_acc"] == s["test_acc_at_best_val"] == 12.0
    assert s["final_acc"] == 40.0
    assert checkpoint.load(run / "best.pt")["epoch"] == 2   # written at epoch 2, not again at the tie
    assert checkpoint.load(run / "last.pt")["epoch"] == 4
    assert json.loads((run / "summary.json").read_text()) == s


def test_selection_on_test_without_a_validation_split(store_dir, tmp_path):
    run = tmp_path / "run"
    s = fit(tiny(data__subset=0.2), info(), out=run, data_dir=store_dir, setup=fixed_scores([], [10.0, 25.0, 20.0]))
    assert s["selection"] == "test" and s["best_epoch"] == 2 and s["best_acc"] == 25.0
    assert "best_val_acc" not in s
    assert checkpoint.load(run / "best.pt")["epoch"] == 2


# ---- the train / validation partition


def test_validation_rows_are_disjoint_from_training_and_the_same_for_every_seed(store_dir, tmp_path):
    rows = []
    for seed in (0, 7):  # the partition is made as the Trainer is built: no epoch needs to run
        recipe = tiny(train__epochs=1, train__seed=seed, data__val_split=0.2)
        with T.Trainer(recipe, info(), out=tmp_path / f"run{seed}", data_dir=store_dir, **QUIET) as t:
            rows.append((t.train_loader.rows, t.val_loader.rows))
    for train, val in rows:
        assert len(train) == 800 and len(val) == 200 and not set(train) & set(val)
        assert sorted(np.concatenate([train, val])) == list(range(1000))
    np.testing.assert_array_equal(rows[0][0], rows[1][0])  # train.seed does not move them
    np.testing.assert_array_equal(rows[0][1], rows[1][1])


def test_split_rows_takes_subsets_and_holds_validation_out_of_the_subset():
    """data.subset keeps a fraction of the train rows (validation included), data.val_split holds a
    fraction of those out, data.test_subset keeps a fraction of the test rows; all sorted, no row twice."""
    from types import SimpleNamespace as D

    assert T.split_rows(1000, 300, D(subset=1.0, val_split=0.0, test_subset=1.0)) == (None, None, None)
    train, val, test = T.split_rows(1000, 300, D(subset=0.2, val_split=0.0, test_subset=1.0))
    assert len(train) == 200 and val is None and test is None
    train, val, test = T.split_rows(1000, 300, D(subset=0.5, val_split=0.2, test_subset=0.3))
    assert (len(train), len(val), len(test)) == (400, 100, 90)
    assert not set(train) & set(val) and len(set(train) | set(val)) == 500
    for rows, n in ((train, 1000), (val, 1000), (test, 300)):
        assert list(rows) == sorted(set(rows)) and 0 <= rows[0] and rows[-1] < n
    whole, held, _ = T.split_rows(1000, 300, D(subset=1.0, val_split=0.2, test_subset=1.0))
    assert (len(whole), len(held)) == (800, 200)
    with pytest.raises(BadInput, match="leaves no validation"):
        T.split_rows(10, 10, D(subset=1.0, val_split=0.01, test_subset=1.0))
