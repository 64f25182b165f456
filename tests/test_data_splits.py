"""Tests for lift3d/data/splits.py: explicit and seeded train/val/test splits."""

from __future__ import annotations

import pytest

from lift3d.data.splits import select_split, split_subjects

SUBJECTS = [f"s{i:02d}" for i in range(10)]


def test_seeded_split_is_disjoint_complete_and_reproducible():
    a = split_subjects(SUBJECTS, test_size=3, val_size=0.2, seed=4)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (5, 2, 3)
    assert sorted(a["train"] + a["val"] + a["test"]) == SUBJECTS
    assert a == split_subjects(SUBJECTS, test_size=3, val_size=0.2, seed=4)
    assert a["test"] != split_subjects(SUBJECTS, test_size=3, val_size=0.2, seed=5)["test"]
    assert a["all"] == SUBJECTS


def test_unshuffled_split_puts_test_last():
    split = split_subjects(SUBJECTS, test_size=2, val_size=1, shuffle=False)
    assert split["test"] == ["s08", "s09"] and split["val"] == ["s07"] and split["train"] == SUBJECTS[:7]


def test_explicit_lists_and_the_rest():
    split = split_subjects(SUBJECTS, test="s01, s03")
    assert split["test"] == ["s01", "s03"] and split["val"] == [] and len(split["train"]) == 8
    split = split_subjects(SUBJECTS, train=["s00", "s02"], val=["s04"])
    assert split["train"] == ["s00", "s02"] and split["val"] == ["s04"] and len(split["test"]) == 7


def test_bad_splits():
    with pytest.raises(ValueError, match="Unknown split 'testing'; valid: train, val, test, all"):
        select_split(SUBJECTS, "testing")
    with pytest.raises(ValueError, match="unknown subjects in test: s99; available: s00"):
        split_subjects(SUBJECTS, test=["s99"])
    with pytest.raises(ValueError, match="subjects in both train and test: s01"):
        split_subjects(SUBJECTS, train=["s01"], test=["s01"])
    with pytest.raises(ValueError, match="test_size=20 is more than the 10 subjects"):
        split_subjects(SUBJECTS, test_size=20)
    with pytest.raises(ValueError, match=r"data: the 'val' split is empty \(10 subjects"):
        select_split(SUBJECTS, "val", where="data")
