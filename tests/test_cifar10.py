"""CIFAR-10: `fastcifar prepare --dataset cifar10` from the official cifar-10-python.tar.gz (five train
batches, test_batch, batches.meta) with every guard CIFAR-100 has, a store beside CIFAR-100's, a
synthetic stand-in, and recipes that choose their data set (data.dataset) with the classes following
the store."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import fastcifar.train as T
from cifar_files import CIFAR10_TRAIN, expected_images, field, make_split, md5, write_official
from fastcifar import owned
from fastcifar.errors import BadInput
from fastcifar import data as fdata
from helpers import QUIET, cli, info, metrics, tiny

LOG = dict(log=lambda *_: None)


def snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(d.iterdir())}


def check_store(store_dir: Path, objs: dict) -> fdata.Store:
    store = fdata.open_store(store_dir, "cifar10")
    train = [objs[name] for name in CIFAR10_TRAIN]
    np.testing.assert_array_equal(store.images("train"), np.concatenate([expected_images(b) for b in train]))
    np.testing.assert_array_equal(store.labels("train"), np.concatenate([field(b, "labels") for b in train]))
    np.testing.assert_array_equal(store.images("test"), expected_images(objs["test_batch"]))
    np.testing.assert_array_equal(store.labels("test"), field(objs["test_batch"], "labels"))
    assert store.labels("train").dtype == np.int64 and store.images("train").flags.c_contiguous
    # CIFAR-10 has no coarse labels: the store holds none, and says which data set it is
    assert store.coarse("train") is None and store.coarse("test") is None
    assert sorted(p.name for p in store_dir.iterdir()) == sorted([*fdata.array_files("cifar10"), "meta.json", owned.MANIFEST])
    assert store.dataset == store.meta["dataset"] == "cifar10" and "coarse_label_names" not in store.meta
    assert store.class_names == [f"class{i}" for i in range(10)]
    assert store.meta["counts"] == {"train": 250, "test": 80}
    return store


# ---- prepare: the official format


def test_prepare_cifar10_tarball_is_pixel_exact(tmp_path, official10):
    tarball, objs = official10
    out = fdata.prepare(tmp_path / "store", source=tarball, verify=False, dataset="cifar10", **LOG)
    store = check_store(out, objs)
    assert store.meta["source"]["md5"] == {"cifar-10-python.tar.gz": md5(tarball)}
    row = field(objs["data_batch_2"], "data")[3]  # train row 50 + 3: batch 2's fourth image, pixel (4, 5)
    assert tuple(store.images("train")[53, 4, 5]) == (row[4 * 32 + 5], row[1024 + 4 * 32 + 5], row[2048 + 4 * 32 + 5])


@pytest.mark.parametrize("form", ["tarball", "directory", "folder holding it"])
def test_prepare_cifar10_verified(tmp_path, official10_md5s, form):
    tarball, objs = official10_md5s
    src = {"tarball": tarball, "directory": tarball.parent / "cifar-10-batches-py", "folder holding it": tarball.parent}[form]
    out = fdata.prepare(tmp_path / "store", source=src, dataset="cifar10", **LOG)
    assert check_store(out, objs).meta["source"]["verified"] is True


def test_prepare_cifar10_reads_python3_pickles(tmp_path):
    tarball, objs = write_official(tmp_path / "src", n_train=250, n_test=80, style="py3", dataset="cifar10")
    check_store(fdata.prepare(tmp_path / "store", source=tarball, verify=False, dataset="cifar10", **LOG), objs)


def test_cifar10_verification_rejects_other_data(tmp_path, official10):
    tarball, _ = official10
    with pytest.raises(BadInput, match="not the official CIFAR-10 tarball"):
        fdata.prepare(tmp_path / "store", source=tarball, dataset="cifar10", **LOG)
    with pytest.raises(BadInput, match="not the official CIFAR-10"):
        fdata.prepare(tmp_path / "store", source=tarball.parent / "cifar-10-batches-py", dataset="cifar10", **LOG)
    with pytest.raises(BadInput, match="no member cifar-100-python/train"):  # CIFAR-10 data is not CIFAR-100's
        fdata.prepare(tmp_path / "store", source=tarball, verify=False, **LOG)
    assert not (tmp_path / "store").exists()


def _bad_members():
    good = make_split(20, 5, dataset="cifar10")
    labels = field(good, "labels")
    names = {b"label_names": [b"x"] * 10}
    return {
        "missing batch": ({"data_batch_3": None}, "no member cifar-10-batches-py/data_batch_3"),
        "CIFAR-100 keys": ({"data_batch_2": {b"data": good[b"data"], b"fine_labels": labels}}, "no 'labels' entry"),
        "label 10": ({"data_batch_5": {**good, b"labels": [10] + labels[1:]}}, r"'data_batch_5'.*outside 0\.\.9"),
        "negative label": ({"test_batch": {**good, b"labels": [-1] + labels[1:]}}, r"outside 0\.\.9"),
        "label count": ({"data_batch_1": {**good, b"labels": labels[:-1]}}, "19 labels but 'data' has 20"),
        "wrong shape": ({"data_batch_4": {**good, b"data": np.zeros((20, 1024), np.uint8)}}, r"shape \(N, 3072\)"),
        "empty batch": ({"data_batch_1": {**good, b"data": np.zeros((0, 3072), np.uint8), b"labels": [],
                                          b"filenames": []}}, "holds no images"),
        "nine names": ({"batches.meta": {b"label_names": [b"x"] * 9}}, "lists 9 names, CIFAR-10 has 10"),
        "names missing": ({"batches.meta": {b"num_vis": 3072}}, "no 'label_names' entry"),
        "names an int": ({"batches.meta": {**names, b"label_names": 10}}, "must be a list of 10 class names"),
        "not a pickle": ({"test_batch": b"not a pickle"}, "'test_batch' is not a readable CIFAR pickle"),
        "code in pickle": ({"data_batch_1": pickle.dumps(os.system)}, "unexpected object"),
        "meta far too big": ({"batches.meta": b"\x80" * (2 << 20)}, "far more than CIFAR-10's 'batches.meta' file"),
    }


@pytest.mark.parametrize("case", list(_bad_members()))
def test_bad_cifar10_source_is_rejected_and_the_good_store_kept(tmp_path, case):
    members, message = _bad_members()[case]
    good, _ = write_official(tmp_path / "good", n_train=50, n_test=20, dataset="cifar10")
    store = fdata.prepare(tmp_path / "store", source=good, verify=False, dataset="cifar10", **LOG)
    before = snapshot(store)
    bad, _ = write_official(tmp_path / "bad", n_train=50, n_test=20, members=members, dataset="cifar10")
    with pytest.raises(BadInput, match=message):
        fdata.prepare(tmp_path / "store", source=bad, verify=False, force=True, dataset="cifar10", **LOG)
    assert snapshot(store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "store"]  # no temp dirs left


def test_an_oversized_batch_file_is_refused_before_it_is_read(tmp_path):
    d, _ = write_official(tmp_path / "dir", n_train=50, n_test=20, tar=False, dataset="cifar10")
    os.truncate(d / "data_batch_2", 600 << 20)  # sparse: 600 MiB by its size, no disk used
    with pytest.raises(BadInput, match="far more than CIFAR-10's 'data_batch_2' file"):
        fdata.prepare(tmp_path / "store", source=d, verify=False, dataset="cifar10", **LOG)
    assert not (tmp_path / "store").exists()


# ---- where the store lives, and what may be replaced


def test_cifar10_lives_beside_cifar100(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTCIFAR_DATA", raising=False)
    assert fdata.default_data_dir("cifar10") == Path("data/cifar10")
    assert fdata.default_data_dir() == fdata.default_data_dir("cifar100") == Path("data/cifar100")
    monkeypatch.setenv("FASTCIFAR_DATA", str(tmp_path / "stores" / "c100"))  # CIFAR-100's store, as before
    assert fdata.default_data_dir() == tmp_path / "stores" / "c100"
    assert fdata.default_data_dir("cifar10") == tmp_path / "stores" / "cifar10"
    fdata.prepare(synthetic=True, n_train=50, n_test=20, dataset="cifar10", **LOG)
    assert fdata.open_store(dataset="cifar10").dataset == "cifar10"
    assert not (tmp_path / "stores" / "c100").exists()


def test_default_cifar10_prepare_downloads_once_beside_the_store(tmp_path, official10_md5s, monkeypatch):
    tarball, objs = official10_md5s
    monkeypatch.setattr(fdata, "URL10", tarball.as_uri())
    store = fdata.prepare(tmp_path / "data" / "cifar10", progress=False, dataset="cifar10", **LOG)
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()
    check_store(store, objs)
    monkeypatch.setattr(fdata, "URL10", "https://example.invalid/never-fetched")
    messages = []
    fdata.prepare(tmp_path / "data" / "cifar10", progress=False, dataset="cifar10", log=messages.append)
    assert "complete CIFAR-10 store already there" in messages[0]


def test_a_store_of_the_other_data_set_is_replaced_only_with_force(tmp_path):
    d = fdata.prepare(tmp_path / "store", synthetic=True, n_train=100, n_test=20, **LOG)  # CIFAR-100
    before = snapshot(d)
    with pytest.raises(BadInput, match="holds a CIFAR-100 store; preparing CIFAR-10 there would replace it"):
        fdata.prepare(d, synthetic=True, n_train=100, n_test=20, dataset="cifar10", **LOG)
    assert snapshot(d) == before
    fdata.prepare(d, synthetic=True, n_train=100, n_test=20, dataset="cifar10", force=True, **LOG)
    assert fdata.open_store(d).dataset == "cifar10"


def test_open_store_checks_the_data_set(tmp_path):
    d10 = fdata.prepare(tmp_path / "c10", synthetic=True, n_train=100, n_test=20, dataset="cifar10", **LOG)
    with pytest.raises(BadInput, match="holds CIFAR-10, but the run is for CIFAR-100"):
        fdata.open_store(d10, "cifar100")
    d100 = fdata.prepare(tmp_path / "c100", synthetic=True, n_train=100, n_test=20, **LOG)
    meta = json.loads((d100 / "meta.json").read_text())
    assert fdata.open_store(d100, "cifar100").dataset == "cifar100"
    (d100 / "meta.json").write_text(json.dumps({**meta, "dataset": "cifar1000"}))
    with pytest.raises(BadInput, match="malformed meta.json .*dataset must be one of cifar100, cifar10"):
        fdata.open_store(d100)
    with pytest.raises(BadInput, match="No prepared CIFAR-10 store .*fastcifar prepare --dataset cifar10"):
        fdata.open_store(tmp_path / "nothing", "cifar10")


def test_damaged_cifar10_labels_are_found_at_open(tmp_path):
    d = fdata.prepare(tmp_path / "store", synthetic=True, n_train=100, n_test=20, dataset="cifar10", **LOG)
    labels = np.load(d / "test_labels.npy")
    labels[3] = 10
    np.save(d / "test_labels.npy", labels)
    with pytest.raises(BadInput, match=r"test labels from 0 to 10, outside 0\.\.9"):
        fdata.open_store(d)


# ---- the synthetic stand-in and the command line


def test_synthetic_cifar10_is_balanced_deterministic_and_learnable(tmp_path):
    a = fdata.open_store(fdata.prepare(tmp_path / "a", synthetic=True, n_train=1000, n_test=500, dataset="cifar10", **LOG))
    b = fdata.open_store(fdata.prepare(tmp_path / "b", synthetic=True, n_train=1000, n_test=500, dataset="cifar10", **LOG))
    np.testing.assert_array_equal(a.images("train"), b.images("train"))
    assert np.bincount(a.labels("train"), minlength=10).tolist() == [100] * 10
    assert len(set(a.class_names)) == 10 and a.synthetic and a.coarse("train") is None
    assert sorted(p.name for p in a.dir.iterdir()) == sorted([*fdata.array_files("cifar10"), "meta.json", owned.MANIFEST])
    thumbs = lambda x: x.astype(np.float32).reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(x), -1)  # noqa: E731
    xtr, xte = thumbs(a.images("train")), thumbs(a.images("test"))
    means = np.stack([xtr[a.labels("train") == c].mean(0) for c in range(10)])
    pred = ((xte[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == a.labels("test")).mean() > 0.3  # chance is 10%


def test_cli_prepare_dataset(tmp_path, official10):
    tarball, objs = official10
    code, out, err = cli("prepare", "--dataset", "CIFAR10", "--from", str(tarball), "--no-verify", "--data-dir",
                         str(tmp_path / "s"), spawn=True)
    assert code == 0, err
    check_store(tmp_path / "s", objs)
    code, out, err = cli("prepare", "--dataset", "cifar1000", "--synthetic", "--data-dir", str(tmp_path / "x"),
                         spawn=True)
    assert code == 2 and "--dataset 'cifar1000': use one of cifar100, cifar10" in err.replace("\n", " ")
    assert "Traceback" not in err and not (tmp_path / "x").exists()


# ---- training on CIFAR-10: the classes follow the store


def test_a_cifar10_recipe_trains_ten_classes_and_evaluates_on_its_store(cifar10_store_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    s = T.train(tiny(train__epochs=1, data__dataset="cifar10"), info(), out=run, data_dir=cifar10_store_dir, **QUIET)
    from fastcifar import checkpoint
    ck = checkpoint.load(run / "last.pt")
    assert ck["model"]["head.fc.weight"].shape[0] == 10 and ck["recipe"]["data"]["dataset"] == "cifar10"
    assert s["finished"] and s["best_acc"] > 25, s  # chance is 10%
    assert s["provenance"]["data"]["dataset"] == "synthetic cifar10"  # what report names when runs' data differ
    assert 0 <= metrics(run)[0]["test_acc"] <= metrics(run)[0]["test_top5"] <= 100
    # eval finds CIFAR-10's store where it lives by default (./data/cifar10), not CIFAR-100's
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCIFAR_DATA", raising=False)
    (tmp_path / "data").mkdir()
    os.symlink(cifar10_store_dir, tmp_path / "data" / "cifar10")
    ev = T.evaluate_checkpoint(str(run), batch_size=100, device="cpu")
    assert ev["images"] == 300 and ev["acc"] == pytest.approx(s["best_acc"])


def test_a_recipe_on_the_other_data_sets_store_is_bad_input(cifar10_store_dir, tmp_path):
    with pytest.raises(BadInput, match="holds CIFAR-10, but the run is for CIFAR-100 .*data.dataset = cifar100"):
        T.train(tiny(train__epochs=1), info(), out=tmp_path / "run", data_dir=cifar10_store_dir, **QUIET)
    assert not (tmp_path / "run").exists()


def test_train_prepares_a_missing_cifar10_store_in_its_own_place(tmp_path, monkeypatch):
    """Without a store, train prepares the recipe's data set where it lives by default; offline it
    says how to make a synthetic one of that data set."""
    fetched = []

    def offline(url, dest, md5, progress=True):
        fetched.append((url, dest))
        raise BadInput(f"Could not download {url} ([Errno -2] Name or service not known).")

    monkeypatch.setattr(fdata, "download", offline)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCIFAR_DATA", raising=False)
    with pytest.raises(BadInput, match=r"No prepared store at data/cifar10.*fastcifar prepare --dataset cifar10 "
                                       r"--synthetic --data-dir data/cifar10") as e:
        T.train(tiny(data__dataset="cifar10"), info(), out=tmp_path / "run", **QUIET)
    assert fetched == [(fdata.URL10, Path("data/cifar-10-python.tar.gz"))], e.value


def test_the_cifar10_recipe_is_wired_end_to_end(cifar10_store_dir, tmp_path):
    """r18_cifar10 as shipped (ResNet-18, CIFAR stem, bf16, EMA, flip TTA, selection on the EMA),
    shrunk to one step of 100 images: a wiring check, not an accuracy one."""
    from fastcifar.config import apply_overrides, load

    r, run_info = load("r18_cifar10")
    assert (r.data.dataset, r.model.cifar_stem, r.train.tta, r.train.select_on) == ("cifar10", True, "flip", "ema")
    assert r.train.ema_decay > 0 and r.loss.label_smoothing > 0 and r.aug.image_size == 32
    apply_overrides(r, ["train.epochs=1", "data.batch_size=100", "data.subset=0.1", "data.test_subset=0.1",
                        "data.backend=torch", "train.device=cpu"])
    s = T.train(r, run_info, out=tmp_path / "run", data_dir=cifar10_store_dir, **QUIET)
    m = metrics(tmp_path / "run")[0]
    assert s["finished"] and (s["select_on"], s["tta"]) == ("ema", "flip") and s["best_acc"] == m["test_acc_ema"]
    plus, _ = load("r18_cifar_32_plus")  # the CIFAR-100 recipe of what helps
    assert (plus.data.dataset, plus.model.cifar_stem, plus.train.tta, plus.train.select_on) == ("cifar100", True, "flip", "ema")
    assert plus.train.ema_decay > 0 and plus.loss.label_smoothing > 0 and plus.aug.image_size == 32
    assert plus.aug.policy == "trivialaugment"
