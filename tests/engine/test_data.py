"""Calibration / evaluation text."""

import json
import os

import pytest
import torch

from adapt_engine.data import DataError, data_fingerprint, load_documents, load_text, sample_windows


def test_default_text_splits_are_disjoint():
    train, held = load_documents(None, "train"), load_documents(None, "heldout")
    assert len(train) > 5 * len(held) > 0
    assert not set(train) & set(held)


def test_local_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("alpha para\n\nbeta para\n\ngamma")
    assert load_documents(str(tmp_path / "a.txt"), "all") == ["alpha para", "beta para", "gamma"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(4)))
    assert load_documents(str(tmp_path / "b.jsonl"), "all") == [f"doc {i}" for i in range(4)]
    import datasets

    datasets.Dataset.from_dict({"content": ["x y", "z w"]}).to_parquet(str(tmp_path / "c.parquet"))
    assert load_text(str(tmp_path / "c.parquet"), "all") == "x y\n\nz w"


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(DataError, match="text field"):
        load_documents(str(tmp_path / "bad.jsonl"), "all")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        load_documents(str(tmp_path / "x.csv"), "all")


def test_sample_windows_and_too_little_text():
    ids = torch.arange(100)
    w = sample_windows(ids, 5, 10, seed=1)
    assert w.shape == (5, 10) and len({int(r[0]) for r in w}) == 5
    assert all(int(r[0]) % 10 == 0 for r in w)  # aligned, non-overlapping
    with pytest.raises(DataError, match="need 220 tokens"):
        sample_windows(ids, 11, 20)


def test_data_fingerprint_follows_contents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\n\ntwo\n")
    first = data_fingerprint(str(f))
    assert data_fingerprint(str(f)) == first
    os.utime(f, (1, 1))  # touched, unchanged: a resume must not be blocked
    assert data_fingerprint(str(f)) == first
    f.write_text("one\n\nTWO\n")  # same size, same path, other text
    assert data_fingerprint(str(f)) != first
    (tmp_path / "b.txt").write_text("three")
    assert data_fingerprint(str(tmp_path)) != data_fingerprint(str(f))
    assert data_fingerprint(None) == data_fingerprint("pydoc")


def test_search_pool_and_validation_split_the_train_split():
    from adapt_engine.data import VALIDATION_FRACTION

    train, pool, val = (load_documents(None, s) for s in ("train", "pool", "validation"))
    assert pool + val == train and pool and val
    assert len(val) == max(1, round(len(train) * VALIDATION_FRACTION))
    assert not set(val) & set(load_documents(None, "heldout"))


def test_calib_indices_select_pool_windows(tmp_path):
    from adapt_engine.data import pool_windows, read_calib_indices, select_windows

    windows = pool_windows(torch.arange(50), 8)
    assert windows.shape == (6, 8) and windows[2, 0] == 16
    picked = select_windows(windows, [5, 0, 5])
    assert picked[:, 0].tolist() == [40, 0, 40]
    with pytest.raises(DataError, match="index 6 is out of range: the pool has 6 windows"):
        select_windows(windows, [1, 6])
    for content in ([3, 1], {"calib_indices": [3, 1], "objective": 2.0}, {"indices": [3, 1]}):
        path = tmp_path / "idx.json"
        path.write_text(json.dumps(content))
        assert read_calib_indices(str(path)) == [3, 1]
    for bad in ([], [-1], ["a"], {"other": [1]}, 3):
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match="non-empty list"):
            read_calib_indices(str(path))
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_calib_indices(str(path))
    with pytest.raises(DataError, match="cannot read"):
        read_calib_indices(str(tmp_path / "missing.json"))
