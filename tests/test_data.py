"""`fastcifar prepare` and `open_store`: pixel-exact conversion, verification, bad input, atomicity."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cifar_files import expected_images, make_split, md5, write_official
from fastcifar import owned
from fastcifar.errors import BadInput
from fastcifar import data as fdata
from helpers import cli


def _snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in sorted(d.iterdir())}


def _check_store(store_dir: Path, objs: dict):
    store = fdata.open_store(store_dir)
    for split in ("train", "test"):
        src = objs[split]
        imgs = store.images(split)
        assert isinstance(imgs, np.memmap)
        assert imgs.dtype == np.uint8 and imgs.flags.c_contiguous and imgs.shape[1:] == (32, 32, 3)
        np.testing.assert_array_equal(imgs, expected_images(src))
        np.testing.assert_array_equal(store.labels(split), src[b"fine_labels"])
        np.testing.assert_array_equal(store.coarse(split), src[b"coarse_labels"])
        assert store.labels(split).dtype == np.int64
    # row i of `data` is 3 planes R, G, B of 32x32: check one pixel by hand
    row = objs["train"][b"data"][7]
    assert tuple(store.images("train")[7, 4, 5]) == (row[4 * 32 + 5], row[1024 + 4 * 32 + 5], row[2048 + 4 * 32 + 5])
    meta = store.meta
    assert meta["counts"] == {"train": len(objs["train"][b"data"]), "test": len(objs["test"][b"data"])}
    assert meta["fine_label_names"][3] == "fine3" and len(meta["coarse_label_names"]) == 20
    assert meta["synthetic"] is False
    x = expected_images(objs["train"]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(meta["mean"], x.mean(0), atol=1e-5)
    np.testing.assert_allclose(meta["std"], x.std(0), atol=1e-5)
    for name, digest in meta["checksums"]["outputs_sha256"].items():
        import hashlib
        assert hashlib.sha256((store_dir / name).read_bytes()).hexdigest() == digest
    return store


def test_prepare_tarball_unverified_is_pixel_exact(tmp_path, official):
    tarball, objs = official
    out = fdata.prepare(tmp_path / "store", source=tarball, verify=False, log=lambda *_: None)
    store = _check_store(out, objs)
    assert store.meta["source"]["verified"] is False
    assert store.meta["checksums"]["source_md5"] == {"cifar-100-python.tar.gz": md5(tarball)}


def test_prepare_tarball_verified(tmp_path, official_md5s):
    tarball, objs = official_md5s
    out = fdata.prepare(tmp_path / "store", source=tarball, log=lambda *_: None)
    assert _check_store(out, objs).meta["source"]["verified"] is True


@pytest.mark.parametrize("verify", [True, False])
def test_prepare_directory(tmp_path, official_md5s, verify):
    tarball, objs = official_md5s
    # both the cifar-100-python/ directory itself and the folder holding it are accepted
    for i, src in enumerate([tarball.parent / "cifar-100-python", tarball.parent]):
        out = fdata.prepare(tmp_path / f"store{i}", source=src, verify=verify, log=lambda *_: None)
        assert _check_store(out, objs).meta["source"]["kind"] == "directory"


def test_prepare_reads_python3_pickles_with_str_keys(tmp_path):
    tarball, objs = write_official(tmp_path / "src", style="py3")
    out = fdata.prepare(tmp_path / "store", source=tarball, verify=False, log=lambda *_: None)
    store = fdata.open_store(out)
    np.testing.assert_array_equal(store.images("test"), expected_images(objs["test"]))
    np.testing.assert_array_equal(store.labels("train"), objs["train"]["fine_labels"])


def test_verification_rejects_other_data(tmp_path, official):
    tarball, _ = official
    with pytest.raises(BadInput, match="not the official"):
        fdata.prepare(tmp_path / "store", source=tarball, log=lambda *_: None)
    with pytest.raises(BadInput, match="not the official"):
        fdata.prepare(tmp_path / "store", source=tarball.parent / "cifar-100-python", log=lambda *_: None)
    assert not (tmp_path / "store").exists()


def _bad_members():
    good = make_split(20, 5)
    return {
        "missing member": ({"test": None}, "no member cifar-100-python/test"),
        "wrong keys": ({"train": {b"pixels": good[b"data"], b"labels": good[b"fine_labels"]}}, "no 'data' entry"),
        "wrong shape": ({"train": {**good, b"data": np.zeros((20, 1000), np.uint8)}}, r"shape \(N, 3072\)"),
        "wrong dtype": ({"train": {**good, b"data": good[b"data"].astype(np.int32)}}, "must be a uint8 array"),
        "label out of range": ({"train": {**good, b"fine_labels": [100] + good[b"fine_labels"][1:]}}, r"outside 0\.\.99"),
        "negative label": ({"test": {**good, b"fine_labels": [-1] + good[b"fine_labels"][1:]}}, r"outside 0\.\.99"),
        "coarse out of range": ({"train": {**good, b"coarse_labels": [20] * 20}}, r"outside 0\.\.19"),
        "label count": ({"train": {**good, b"fine_labels": good[b"fine_labels"][:-1]}}, "19 labels but 'data' has 20"),
        "meta names": ({"meta": {b"fine_label_names": [b"x"] * 99, b"coarse_label_names": [b"y"] * 20}}, "99 names"),
        "not a pickle": ({"train": b"this is not a pickle"}, "not a readable CIFAR pickle"),
        "not a dict": ({"train": [1, 2, 3]}, "holds a list"),
        "code in pickle": ({"train": pickle.dumps(os.system)}, "unexpected object"),
    }


@pytest.mark.parametrize("case", list(_bad_members()))
def test_bad_source_is_rejected_and_good_store_kept(tmp_path, case):
    members, message = _bad_members()[case]
    good_tar, _ = write_official(tmp_path / "good")
    store = fdata.prepare(tmp_path / "store", source=good_tar, verify=False, log=lambda *_: None)
    before = _snapshot(store)
    bad_tar, _ = write_official(tmp_path / "bad", members=members)
    with pytest.raises(BadInput, match=message):
        fdata.prepare(tmp_path / "store", source=bad_tar, verify=False, force=True, log=lambda *_: None)
    assert _snapshot(store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "store"]  # no temp dirs left


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_truncated_or_corrupt_tarball(tmp_path, official, damage):
    tarball, _ = official
    raw = tarball.read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": os.urandom(5000), "empty": b""}[damage])
    with pytest.raises(BadInput, match="truncated or not a valid tar.gz"):
        fdata.prepare(tmp_path / "store", source=bad, verify=False, log=lambda *_: None)
    assert not (tmp_path / "store").exists()


def test_unwritable_output_dir(tmp_path, official):
    tarball, _ = official
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(BadInput, match="Cannot write the store"):
        fdata.prepare(blocker / "store", source=tarball, verify=False, log=lambda *_: None)


def test_idempotent_and_force(tmp_path, official):
    tarball, _ = official
    store = fdata.prepare(tmp_path / "store", source=tarball, verify=False, log=lambda *_: None)
    before = _snapshot(store)
    messages = []

    def must_not_run(*a, **k):
        raise AssertionError("the second run read or hashed the source")

    # returning at once means: neither hashing the 161 MB tarball nor unpacking it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fdata, "_digest", must_not_run)
        mp.setattr(fdata, "_read_official", must_not_run)
        fdata.prepare(tmp_path / "store", source=tarball, verify=False, log=messages.append)
    assert "already there" in messages[0]
    assert _snapshot(store) == before  # same inodes, same mtimes: nothing rewritten
    fdata.prepare(tmp_path / "store", source=tarball, verify=False, force=True, log=lambda *_: None)
    after = _snapshot(store)
    same = lambda snap: {k: v[2] for k, v in snap.items() if k not in ("meta.json", owned.MANIFEST)}  # noqa: E731
    assert same(after) == same(before)  # the same arrays (meta.json's date and the record of inodes differ)
    assert after["train_images.npy"][1] != before["train_images.npy"][1]  # rebuilt: a new file


def test_a_changed_source_at_the_same_path_is_read_again(tmp_path):
    """The idempotence check keys on the source's size and mtime, not only its path: a new tarball
    written over the old one (another download, other data) rebuilds the store."""
    tarball, _ = write_official(tmp_path / "src", n_train=300)
    store = fdata.prepare(tmp_path / "store", source=tarball, verify=False, log=lambda *_: None)
    assert fdata.open_store(store).meta["counts"]["train"] == 300
    assert write_official(tmp_path / "src", n_train=200)[0] == tarball
    messages = []
    fdata.prepare(tmp_path / "store", source=tarball, verify=False, log=messages.append)
    assert not any("already there" in m for m in messages)
    assert fdata.open_store(store).meta["counts"]["train"] == 200


def test_a_synthetic_store_of_other_settings_is_rebuilt_without_force(tmp_path):
    """"already there" only for the same synthetic settings: another seed or test count rebuilds."""
    quiet = lambda *_: None
    store = fdata.prepare(tmp_path / "s", synthetic=True, n_train=100, n_test=50, log=quiet)
    fdata.prepare(store, synthetic=True, n_train=100, n_test=50, seed=1, log=quiet)
    assert fdata.open_store(store).meta["source"]["seed"] == 1
    fdata.prepare(store, synthetic=True, n_train=100, n_test=60, seed=1, log=quiet)
    assert fdata.open_store(store).meta["counts"] == {"train": 100, "test": 60}


def test_failure_part_way_leaves_no_store(tmp_path, official, monkeypatch):
    tarball, _ = official
    real_save, calls = np.save, []

    def flaky_save(path, arr):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_save(path, arr)

    monkeypatch.setattr(fdata.np, "save", flaky_save)
    with pytest.raises(BadInput, match="No space left"):
        fdata.prepare(tmp_path / "store", source=tarball, verify=False, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # neither a store nor a temp dir


def test_download_verifies_and_cleans_up(tmp_path, official):
    tarball, _ = official
    url = tarball.as_uri()
    dest = tmp_path / "dl" / "x.tar.gz"
    fdata.download(url, dest, md5(tarball), progress=False)
    assert md5(dest) == md5(tarball)
    dest.unlink()
    with pytest.raises(BadInput, match="expected 0000"):
        fdata.download(url, dest, "0000", progress=False)
    assert list(dest.parent.iterdir()) == []
    with pytest.raises(BadInput, match="Could not download"):
        fdata.download((tmp_path / "missing.tar.gz").as_uri(), dest, None, progress=False)
    assert list(dest.parent.iterdir()) == []
    # a failed download removes the folders it made for dest (`data/` of a first prepare), none other
    deep = tmp_path / "new" / "data" / "x.tar.gz"
    with pytest.raises(BadInput, match="Could not download"):
        fdata.download((tmp_path / "missing.tar.gz").as_uri(), deep, None, progress=False)
    assert not (tmp_path / "new").exists() and dest.parent.is_dir()


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    class Response:
        headers = {"Content-Length": "3000000"}
        chunks = [b"x" * (1 << 20)]

        def read(self, n):
            if self.chunks:
                return self.chunks.pop()
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(fdata.urllib.request, "urlopen", lambda url, timeout: Response())
    with pytest.raises(KeyboardInterrupt):
        fdata.download("https://example.invalid/x.tar.gz", tmp_path / "x.tar.gz", None, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_prepare_downloads_once(tmp_path, official_md5s, monkeypatch):
    tarball, objs = official_md5s
    monkeypatch.setattr(fdata, "URL", tarball.as_uri())
    store = fdata.prepare(tmp_path / "data" / "cifar100", progress=False, log=lambda *_: None)
    assert (tmp_path / "data" / "cifar-100-python.tar.gz").is_file()  # cached beside the store
    _check_store(store, objs)
    monkeypatch.setattr(fdata, "URL", "https://example.invalid/never-fetched")
    messages = []
    fdata.prepare(tmp_path / "data" / "cifar100", progress=False, log=messages.append)
    assert "already there" in messages[0]


def test_open_store_errors(tmp_path, official):
    with pytest.raises(BadInput, match="fastcifar prepare"):
        fdata.open_store(tmp_path / "nothing")
    tarball, _ = official
    store = fdata.prepare(tmp_path / "store", source=tarball, verify=False, log=lambda *_: None)
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(BadInput, match="format version 99"):
        fdata.open_store(store)
    (store / "meta.json").write_text(json.dumps({**meta, "counts": {"train": 5, "test": 100}}))
    with pytest.raises(BadInput, match="does not match its meta.json"):
        fdata.open_store(store)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_DATA", str(tmp_path / "env_store"))
    assert fdata.default_data_dir() == tmp_path / "env_store"
    fdata.prepare(synthetic=True, n_train=100, n_test=100, log=lambda *_: None)
    assert fdata.open_store().meta["counts"] == {"train": 100, "test": 100}


def test_data_dir_from_environment_expands_a_tilde(tmp_path, monkeypatch):
    """$FASTCIFAR_DATA=~/... that no shell expanded (a Dockerfile ENV, a .env file) names the home
    directory's folder, not a directory called '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTCIFAR_DATA", "~/stores/c100")
    assert fdata.default_data_dir() == tmp_path / "home" / "stores" / "c100"
    assert fdata.default_data_dir("cifar10") == tmp_path / "home" / "stores" / "cifar10"


def test_synthetic_store_is_balanced_deterministic_and_learnable(tmp_path):
    a = fdata.open_store(fdata.prepare(tmp_path / "a", synthetic=True, n_train=3000, n_test=1000, log=lambda *_: None))
    b = fdata.open_store(fdata.prepare(tmp_path / "b", synthetic=True, n_train=3000, n_test=1000, log=lambda *_: None))
    assert a.synthetic and a.meta["source"]["kind"] == "synthetic"
    np.testing.assert_array_equal(a.images("train"), b.images("train"))
    assert np.bincount(a.labels("train"), minlength=100).tolist() == [30] * 100
    np.testing.assert_array_equal(a.coarse("test"), a.labels("test") // 5)
    assert not np.array_equal(a.images("train")[:100], a.images("test")[:100])
    # Learnable: a nearest-class-mean on 8x8 thumbnails already beats chance (1%) many times over.
    def thumbs(x):
        return x.reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(x), -1)
    xtr, xte = thumbs(a.images("train").astype(np.float32)), thumbs(a.images("test").astype(np.float32))
    means = np.stack([xtr[a.labels("train") == c].mean(0) for c in range(100)])
    pred = ((xte[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == a.labels("test")).mean() > 0.05


def test_synthetic_test_split_is_not_the_train_split(tmp_path):
    """The test split is drawn from its own seed: with as many test as train images it must not be a
    copy of the train split (a test set equal to the train set reports memorisation as accuracy)."""
    s = fdata.open_store(fdata.prepare(tmp_path / "s", synthetic=True, n_train=100, n_test=100, log=lambda *_: None))
    assert not np.array_equal(s.images("train"), s.images("test"))
    assert not np.array_equal(s.labels("train"), s.labels("test"))


def test_synthetic_labels_are_shuffled_not_cyclic():
    """synthetic_chunks' classes are balanced and shuffled (its docstring): not 0, 1, .., 99, 0, ..,
    whose every run of 100 rows (a validation tail, a batch) would hold each class exactly once."""
    labels, _ = fdata.synthetic_chunks(1000, seed=0)
    assert np.bincount(labels, minlength=100).tolist() == [10] * 100
    assert not np.array_equal(labels, np.arange(1000) % 100)
    assert len(np.unique(labels[:100])) < 100


def test_cli_prepare_end_to_end(tmp_path, official):
    tarball, objs = official
    code, out, err = cli("prepare", "--from", str(tarball), "--no-verify", "--data-dir", str(tmp_path / "store"),
                         spawn=True)
    assert code == 0, err
    _check_store(tmp_path / "store", objs)
    code, out, err = cli("prepare", "--from", str(tarball), "--data-dir", str(tmp_path / "store2"), spawn=True)
    assert code == 2
    assert "not the official" in err and "Traceback" not in err
    assert not (tmp_path / "store2").exists()
    code, out, err = cli("prepare", "--synthetic", "--train", "200", "--test", "100", "--data-dir",
                         str(tmp_path / "syn"), spawn=True)
    assert code == 0, err
    assert fdata.open_store(tmp_path / "syn").synthetic
    code, out, err = cli("prepare", "--synthetic", "--train", "0", "--data-dir", str(tmp_path / "syn0"), spawn=True)
    assert code == 2 and "at least 1" in err
    code, out, err = cli("--version", spawn=True)
    assert code == 0 and out.startswith("fastcifar ")
    code, out, err = cli("prepare", "--help", spawn=True)
    assert code == 0 and "--synthetic" in out and "--no-verify" in out


def test_full_size_prepare_stays_under_1_5_gb(tmp_path):
    """The real set is 50000 + 10000 images; peak memory must stay below 1.5 GB."""
    tarball, _ = write_official(tmp_path / "src", n_train=50000, n_test=10000)
    # VmHWM: this process's peak resident memory (unlike ru_maxrss, it does not inherit the
    # RSS of the pytest process that forked it)
    code = ("from fastcifar.data import prepare; "
            f"prepare({str(tmp_path / 'store')!r}, source={str(tarball)!r}, verify=False, log=lambda *_: None); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stdout.split()[-1]) / 1024  # VmHWM is in kB
    assert peak_mb < 1500, f"peak RSS {peak_mb:.0f} MB"
    assert fdata.open_store(tmp_path / "store").meta["counts"] == {"train": 50000, "test": 10000}
