"""accel with --allocation global --groups ...,stem: the hidden size shrinks between phases, AdamW follows, and a
resumed run (its checkpoint holds a model of another hidden size) equals the uninterrupted one; and --prune-every:
slices of the global ranking inside training land on the target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapt_engine.accel import AccelConfig, run
from adapt_engine.errors import UsageError
from adapt_engine.report import format_report

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("accel-stem") / "tiny-llama", tiny_tokenizer)


def _cfg(model_dir, out, **kw) -> AccelConfig:
    base = dict(output=str(out), model=str(model_dir), sparsity=0.4, interleaves=3, train_tokens=48 * 16,
                seq_len=16, global_batch=8, micro_batch=4, lr=2e-3, min_lr=2e-4, calib_samples=8, calib_seq_len=16,
                calib_batch_size=4, val_tokens=256, prune_steps=1, seed=0, no_bench=True, allocation="global",
                groups="heads,stem")  # the tiny Llama sheds stem blocks of 6 only when MLP channels are not offered
    base.update(kw)
    return AccelConfig.from_flat(**base)


def test_resumed_stem_run_equals_uninterrupted(model_dir, tmp_path):
    reference = run(_cfg(model_dir, tmp_path / "ref"))
    hidden = [rec["hidden_size"] for rec in reference.report["prune_history"]]
    assert hidden[-1] < 48 and reference.report["hidden_size_after"] == hidden[-1]

    def stop(rec):
        if rec["global_step"] == 4:
            raise Interrupt

    cfg = _cfg(model_dir, tmp_path / "cut")
    with pytest.raises(Interrupt):
        run(cfg, on_step=stop)
    resumed = run(_cfg(model_dir, tmp_path / "cut", resume=True))
    a, b = reference.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p["ppl"] for p in resumed.report["phases"]] == [p["ppl"] for p in reference.report["phases"]]


def test_phases_prune_stem_channels_from_training_saliency(model_dir, tmp_path):
    cfg = _cfg(model_dir, tmp_path / "out", saliency="train")
    r = run(cfg).report
    prunes = [x for x in _records(cfg.output) if x["event"] == "prune"]
    assert [p["saliency"] for p in prunes] == ["calib", "train", "train"]
    assert r["hidden_size_after"] < r["hidden_size_before"]
    assert 0 <= r["params_after"] - r["target_params"]


# ---------------------------------------------------------------------------------------------------------
# --prune-every: slices of the global ranking inside training (EfficientLLM's P:T = --slice-groups P
# --prune-every T)
# ---------------------------------------------------------------------------------------------------------


def _slices_cfg(model_dir, out, **kw) -> AccelConfig:
    # 96 windows of 16 tokens, 8 per step: 12 optimizer steps in one training stage
    base = dict(train_tokens=96 * 16, interleaves=AccelConfig.interleaves, prune_steps=None, saliency="train",
                groups="heads,mlp,stem", prune_every=2)
    base.update(kw)
    return _cfg(model_dir, out, **base)


def _records(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("k,groups", [(2, 20), (3, 200)])
def test_slices_every_k_steps_land_on_the_target(model_dir, tmp_path, k, groups):
    """(2, 20): 20 groups per slice cannot reach the target before the last slice point with training after it
    (step 10), which removes the rest; (3, 200): the first slice reaches it, no later slice follows."""
    cfg = _slices_cfg(model_dir, tmp_path / "out", prune_every=k, slice_groups=groups)
    result = run(cfg)
    r = result.report
    slices = r["slices"]
    assert [s["global_step"] for s in slices] == list(range(k, k * len(slices) + 1, k))
    assert all(s["groups"] == groups and not s["last"] for s in slices[:-1])
    removed = sum(s["groups"] for s in slices)
    last = slices[-1]
    assert last["last"] and all(s["saliency"] == "train" for s in slices)
    if last["forced"]:  # the closing slice: the last step with training after it
        assert last["global_step"] + k >= r["optimizer_steps"] > last["global_step"] and last["groups"] > groups
    else:
        assert len(slices) == -(-removed // groups)  # ceil(groups removed / --slice-groups)
    # lands like `prune`: at or above the target, by less than one MLP channel (3 x hidden, no biases here)
    assert 0 <= r["params_after"] - r["target_params"] < 3 * r["hidden_size_after"]
    assert last["params"] == r["params_after"] == sum(p.numel() for p in result.model.parameters())
    assert r["optimizer_steps"] == 12 and [p["steps"] for p in r["phases"]] == [12]
    assert (r["settings"]["prune_every"], r["settings"]["slice_groups"]) == (k, groups)
    assert sum(sum(s["removed_params"].values()) for s in slices) == r["params_before"] - r["params_after"]
    records = _records(cfg.output)
    assert [x["global_step"] for x in records if x["event"] == "slice"] == [s["global_step"] for s in slices]
    steps = [x for x in records if x["event"] == "step"]
    # every step after a slice trains the smaller model
    for s in slices:
        assert steps[s["global_step"]]["params"] == s["params"]
    assert (Path(cfg.output) / "pruning_report.png").stat().st_size > 1000
    assert len(r["prune_history"]) == len(slices)


@pytest.mark.parametrize("kw", [dict(distill="kd"), dict(saliency="calib"), dict(reset_optimizer=True)])
def test_slices_with_a_teacher_calibration_scores_or_a_fresh_optimizer(model_dir, tmp_path, kw):
    r = run(_slices_cfg(model_dir, tmp_path / "out", slice_groups=40, **kw)).report
    assert 0 <= r["params_after"] - r["target_params"] < 3 * r["hidden_size_after"]
    assert {s["saliency"] for s in r["slices"]} == {kw.get("saliency", "train")}
    assert "slices         " in format_report(r)
    if "distill" in kw:
        assert r["phases"][0]["teacher"]["name"] == "snapshot-original"


def test_slices_prune_stem_channels_scored_by_the_training_tap(model_dir, tmp_path):
    r = run(_slices_cfg(model_dir, tmp_path / "out", groups="heads,stem", slice_groups=2)).report
    assert r["hidden_size_after"] < r["hidden_size_before"] == 48
    assert any(s["removed_params"]["stem"] for s in r["slices"] if s["saliency"] == "train")
    assert r["slices"][-1]["hidden_size"] == r["hidden_size_after"]


@pytest.mark.parametrize("kw,match", [
    (dict(interleaves=5), "drop --interleaves"),
    (dict(prune_steps=2), "drop --prune-steps"),
    (dict(allocation="adaptive", groups="heads,mlp"), "--allocation global"),
    (dict(distill="progressive"), "--distill kd or none"),
    (dict(fsdp=True, saliency="calib"), "drop --fsdp"),
    (dict(prune_every=0, slice_groups=4, interleaves=3, prune_steps=1), "add --prune-every"),
])
def test_prune_every_refuses_what_it_cannot_do(model_dir, tmp_path, kw, match):
    with pytest.raises(UsageError, match=match):
        _slices_cfg(model_dir, tmp_path / "x", **kw).validate()


def test_prune_every_needs_training_after_a_slice(model_dir, tmp_path):
    with pytest.raises(UsageError, match="Lower --prune-every"):
        run(_slices_cfg(model_dir, tmp_path / "x", prune_every=12))
