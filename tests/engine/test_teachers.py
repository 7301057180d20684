"""NutePrune's teacher rule (Eq. 8-9 on parameter counts) on hand-made sizes, the snapshot interval, and the
snapshot folder (written in the reloadable format, one teacher resident at a time)."""

from __future__ import annotations

import pytest
import torch

from adapt_engine.teachers import (
    ORIGINAL,
    ResidentTeacher,
    SnapshotError,
    SnapshotStore,
    select_teacher,
    snapshot_due,
    unreachable,
)

ORIG = 1000
# The original and snapshots every 2 % of the original size, down to 86 %.
SNAPS = [{"name": ORIGINAL, "params": ORIG}] + [{"name": f"s{p}", "params": p} for p in range(980, 859, -20)]


@pytest.mark.parametrize("student,teacher", [
    (990, ORIGINAL),  # ŝ(S) = 0.01 < g: Eq. 9, the original
    (950, ORIGINAL),
    (900, ORIGINAL),  # ŝ(S) = 0.10 = g: only ŝ(T) <= 0, the original
    (890, ORIGINAL),  # ŝ(S) = 0.11 < g + i = 0.12: still Eq. 9
    (880, "s980"),    # ŝ(S) = 0.12: ŝ(T) <= 0.02 -> the 2 % snapshot
    (870, "s980"),    # Eq. 8 with T = s980: 0.12 < 0.13 < 0.14
    (860, "s960"),
    (845, "s960"),    # Eq. 8 with T = s960 (ŝ 0.04): 0.14 < 0.155 < 0.16; s940 (0.06) is too close
    (700, "s860"),    # far below every snapshot: the most pruned one
])
def test_teacher_is_the_most_pruned_snapshot_at_least_gap_larger(student, teacher):
    assert select_teacher(SNAPS, student, ORIG, gap=0.10)["name"] == teacher


def test_gap_is_a_fraction_of_the_original_size():
    assert select_teacher(SNAPS, 930, ORIG, gap=0.05)["name"] == "s980"
    assert select_teacher(SNAPS, 930, ORIG, gap=0.20)["name"] == ORIGINAL


def test_snapshot_interval_counts_shrinkage_since_the_newest_snapshot():
    snaps = [{"name": ORIGINAL, "params": ORIG}, {"name": "a", "params": 950}]
    assert not snapshot_due(snaps, 945, ORIG, interval=0.01)   # 0.5 % since the newest
    assert snapshot_due(snaps, 940, ORIG, interval=0.01)       # exactly 1 %
    assert snapshot_due(snaps, 949, ORIG, interval=0.0)        # 0: every phase that shrank
    assert not snapshot_due(snaps, 950, ORIG, interval=0.0)    # a phase that did not shrink


def test_snapshots_larger_than_the_teacher_are_never_needed_again_except_the_original():
    teacher = select_teacher(SNAPS, 860, ORIG, gap=0.10)
    gone = unreachable(SNAPS, teacher, ORIG)
    assert [s["name"] for s in gone] == ["s980"]
    # a later (smaller) student never picks what was dropped
    left = [s for s in SNAPS if s not in gone]
    for student in range(860, 600, -7):
        assert select_teacher(left, student, ORIG, 0.10) == select_teacher(SNAPS, student, ORIG, 0.10)


def test_store_writes_reloadable_snapshots_and_keeps_one_teacher(tmp_path, tiny_tokenizer):
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama", vocab=len(tiny_tokenizer))
    store = SnapshotStore(tmp_path / "snapshots")
    store.open(fresh=True)
    store.write(model, tiny_tokenizer, "snapshot-a")
    store.write(model, tiny_tokenizer, "snapshot-b")
    resident = ResidentTeacher(store, "cpu", torch.bfloat16)
    a = resident.get("snapshot-a")
    assert a.dtype == torch.bfloat16 and not any(p.requires_grad for p in a.parameters()) and not a.training
    assert resident.get("snapshot-a") is a  # resident: not reloaded
    b = resident.get("snapshot-b")
    assert b is not a and resident.name == "snapshot-b"
    torch.testing.assert_close(b.model.embed_tokens.weight.float(), model.model.embed_tokens.weight.bfloat16().float())
    with pytest.raises(SnapshotError, match="missing"):
        resident.get("snapshot-c")
    store.open(fresh=True)  # a fresh run clears an earlier run's snapshots
    assert not store.path("snapshot-a").exists()
    store.remove()
    assert not store.folder.exists()
