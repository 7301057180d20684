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
