"""Adapt-Accel end to end on a tiny model: phases, output, exact resume (exception and SIGKILL), corrupt
and mismatched checkpoints, NaN stop, and 2-process DDP (gloo) equal to one process."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adapt_engine import accel
from adapt_engine.accel import (
    AccelConfig,
    TrainingDivergedError,
    add_accel_arguments,
    config_from_args,
    phase_shares,
    phase_targets,
    plan_data,
    rank_share,
    run,
    split_counts,
)
from adapt_engine.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_trainer_state
from adapt_engine.report import format_report

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------------------
# Phase arithmetic and data plan
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_phase_shares_grow_linearly_and_sum_to_one(n):
    shares = phase_shares(n)
    assert math.isclose(sum(shares), 1.0)
    assert all(math.isclose(b - a, shares[0]) for a, b in zip(shares, shares[1:]))  # linear growth
    assert math.isclose(shares[-1] / shares[0], n)


def test_phase_targets_shrink_geometrically_to_the_target():
    t = phase_targets(350_000_000, 125_000_000, 20)
    assert t[-1] == 125_000_000 and len(t) == 20
    ratios = [b / a for a, b in zip([350_000_000] + t[:-1], t)]
    assert all(abs(r - (125 / 350) ** (1 / 20)) < 1e-6 for r in ratios)  # P ≈ 0.95 per phase, as the paper


@pytest.mark.parametrize("total,n", [(0, 3), (7, 3), (48, 3), (1000, 20), (5, 20)])
def test_split_counts_is_exact(total, n):
    counts = split_counts(total, phase_shares(n))
    assert sum(counts) == total and all(c >= 0 for c in counts)
    assert all(abs(c - total * s) < 1 for c, s in zip(counts, phase_shares(n)))


def test_data_plan_draws_without_replacement():
    ids = torch.arange(1000)
    cfg = AccelConfig.from_flat(output="x", sparsity=0.5, interleaves=4, train_tokens=400, seq_len=10, seed=3)
    plan = plan_data(ids, cfg)
    firsts = plan.windows[:, 0].tolist()
    assert len(firsts) == 40 and len(set(firsts)) == 40  # distinct windows
    assert all(f % 10 == 0 for f in firsts)  # aligned, non-overlapping windows of the packed stream
    assert [b - a for a, b in plan.bounds] == [4, 8, 12, 16]
    assert sorted(firsts) != firsts  # random order
    with pytest.raises(ValueError, match="needs 200 windows"):
        plan_data(ids, AccelConfig.from_flat(output="x", sparsity=0.5, train_tokens=2000, seq_len=10))


@pytest.mark.parametrize("n,world", [(8, 2), (7, 2), (3, 4), (1, 2), (128, 3)])
def test_rank_shares_partition_the_batch_in_order(n, world):
    shares = [list(rank_share(n, r, world)) for r in range(world)]
    assert sum(shares, []) == list(range(n))  # contiguous blocks, in order, disjoint, complete
    assert max(map(len, shares)) - min(map(len, shares)) <= max(1, -(-n // world))


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


def _cfg(model_dir, out, **kw) -> AccelConfig:
    # 48 windows of 16 tokens over 3 phases: 8 / 16 / 24 windows, 1 + 2 + 3 optimizer steps of 8 sequences.
    base = dict(output=str(out), model=str(model_dir), sparsity=0.4, interleaves=3, train_tokens=48 * 16,
                seq_len=16, global_batch=8, micro_batch=4, lr=2e-3, min_lr=2e-4, calib_samples=8, calib_seq_len=16,
                calib_batch_size=4, val_tokens=256, prune_steps=1, seed=0, no_bench=True)
    base.update(kw)
    return AccelConfig.from_flat(**base)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), f"{k} differs by {(sa[k] - sb[k]).abs().max()}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("accel") / "tiny-llama", tiny_tokenizer)


@pytest.mark.parametrize("variant", [dict(), dict(saliency="train", reset_optimizer=True, no_checkpoints=True)])
def test_run_end_to_end(model_dir, tmp_path, variant):
    from adapt_engine.saving import load_pruned

    cfg = _cfg(model_dir, tmp_path / "out", checkpoint_every=2, **variant)
    steps, checkpointed = [], []

    def on_step(rec):
        steps.append(rec)
        checkpointed.append(latest_checkpoint(cfg.run_dir() / "checkpoints") is not None)

    result = run(cfg, on_step=on_step)
    assert any(checkpointed) != cfg.no_checkpoints
    report = result.report
    assert [s["global_step"] for s in steps] == list(range(1, 7))
    assert [p["steps"] for p in report["phases"]] == [1, 2, 3]
    assert [p["params"] for p in report["phases"]] == sorted([p["params"] for p in report["phases"]], reverse=True)
    assert report["params_after"] < report["params_before"]
    assert abs(report["params_after"] - report["target_params"]) < 3 * 48  # within a few MLP channels
    assert all(p["ppl"] is not None and p["ppl"] > 1 for p in report["phases"])
    assert report["tokens_used"] == 48 * 16
    lrs = [s["lr"] for s in steps]
    assert max(lrs) == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4)  # one WSD schedule over phases
    out = Path(cfg.output)
    reloaded = load_pruned(out)
    _assert_same_weights(reloaded, result.model)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("step") == 6
    assert [r["event"] for r in records].count("prune") == 3
    assert (out / "accel_progress.png").stat().st_size > 1000
    assert json.loads((out / "pruning_report.json").read_text())["command"] == "accel"
    assert not cfg.run_dir().exists()  # checkpoints removed after success
    if variant.get("saliency") == "train":
        prunes = [r for r in records if r["event"] == "prune"]
        assert [p["saliency"] for p in prunes] == ["calib", "train", "train"]


class Interrupt(Exception):
    pass


def _interrupt_at(step):
    def hook(rec):
        if rec["global_step"] == step:
            raise Interrupt

    return hook


# The run every exactness test compares against: training-gradient saliency (so resuming must restore the
# accumulated scores too) and micro-batches of 2, so that 2 DDP ranks see the same micro-batches.
REF = dict(saliency="train", micro_batch=2)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted single-process run."""
    return run(_cfg(model_dir, tmp_path_factory.mktemp("reference") / "out", **REF))


def distill_settings(mode: str) -> dict:
    """--distill with a gap the tiny model's phases (about 10 % of its parameters each) can span."""
    return dict(distill=mode, distill_gap=0.05, snapshot_interval=0.0, kd_layer_weight=0.5)


@pytest.fixture(scope="module")
def distill_reference(model_dir, tmp_path_factory):
    """Uninterrupted single-process runs with --distill kd / progressive (made on first use)."""
    made: dict = {}

    def get(mode: str):
        if mode not in made:
            out = tmp_path_factory.mktemp(f"reference-{mode}") / "out"
            made[mode] = run(_cfg(model_dir, out, **REF, **distill_settings(mode)))
        return made[mode]

    return get


# --prune-every: one training stage of 6 steps, slices of the global ranking (stem channels included, scored by
# the training tap) after steps 2 and 4; the slice after step 4 is the last with training after it and closes.
SLICES = dict(REF, interleaves=AccelConfig.interleaves, prune_steps=None, allocation="global",
              groups="heads,mlp,stem", prune_every=2, slice_groups=10)


@pytest.fixture(scope="module")
def slices_reference(model_dir, tmp_path_factory):
    """An uninterrupted --prune-every run."""
    return run(_cfg(model_dir, tmp_path_factory.mktemp("reference-slices") / "out", **SLICES))


@pytest.mark.parametrize("checkpoint_every,stop,mode", [(0, 4, "phases"), (2, 5, "phases"), (1, 3, "slices"),
                                                        (2, 3, "slices"), (2, 5, "slices")])
def test_resume_after_interrupt_matches_uninterrupted(model_dir, tmp_path, reference, slices_reference,
                                                      checkpoint_every, stop, mode):
    """(0, 4): resumes at the phase-2/3 boundary (re-prunes from the saved scores); (2, 5): mid-phase. --prune-every:
    (1, 3) resumes between slices with the tap's scores (stem too) half accumulated; (2, 3) from the checkpoint
    taken right after the first slice (which must not run again); (2, 5) after the pruning period."""
    kw, expected = (REF, reference) if mode == "phases" else (SLICES, slices_reference)
    cfg = _cfg(model_dir, tmp_path / "cut", checkpoint_every=checkpoint_every, **kw)
    with pytest.raises(Interrupt):
        run(cfg, on_step=_interrupt_at(stop))
    assert latest_checkpoint(cfg.run_dir() / "checkpoints") is not None
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg)
    resumed = run(_cfg(model_dir, tmp_path / "cut", checkpoint_every=checkpoint_every, resume=True, **kw))
    _assert_same_weights(expected.model, resumed.model)
    assert [p["ppl"] for p in resumed.report["phases"]] == [p["ppl"] for p in expected.report["phases"]]
    lines = (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["event"] == "step" for x in lines) == 6  # replayed steps are not logged twice
    if mode == "slices":
        assert [s["global_step"] for s in expected.report["slices"]] == [2, 4]
        assert resumed.report["slices"] == expected.report["slices"]
        assert [json.loads(x)["global_step"] for x in lines if json.loads(x)["event"] == "slice"] == [2, 4]


@pytest.mark.parametrize("mode", ["none", "progressive"])
def test_resume_after_sigkill_matches_uninterrupted(model_dir, tmp_path, reference, distill_reference, mode):
    kw = REF if mode == "none" else {**REF, **distill_settings(mode)}
    expected = reference if mode == "none" else distill_reference(mode)
    cfg = _cfg(model_dir, tmp_path / "killed", checkpoint_every=1, **kw)
    cmd = [sys.executable, "-m", "adapt_engine.cli", "accel", "--model", str(model_dir), "--output", cfg.output,
           "--sparsity", "0.4", "--interleaves", "3", "--train-tokens", str(cfg.train_tokens), "--seq-len", "16",
           "--global-batch", "8", "--micro-batch", "2", "--lr", "2e-3", "--min-lr", "2e-4", "--calib-samples", "8",
           "--calib-seq-len", "16", "--calib-batch-size", "4", "--val-tokens", "256", "--prune-steps", "1",
           "--saliency", "train", "--checkpoint-every", "1"]
    if mode != "none":
        cmd += ["--distill", mode, "--distill-gap", "0.05", "--snapshot-interval", "0", "--kd-layer-weight", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    pointer = cfg.run_dir() / "checkpoints" / "latest.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not pointer.is_file():
            time.sleep(0.01)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)  # kill -9 right after its first checkpoint
    finally:
        proc.kill()
        proc.wait()
    assert not Path(cfg.output).exists()
    resumed = run(_cfg(model_dir, tmp_path / "killed", checkpoint_every=1, resume=True, **kw))
    _assert_same_weights(expected.model, resumed.model)


def test_distill_runs_report_their_teachers_and_log_their_terms(model_dir, distill_reference):
    kd, progressive = distill_reference("kd"), distill_reference("progressive")
    original = kd.report["params_before"]
    assert [p["teacher"] for p in kd.report["phases"]] == [{"name": "snapshot-original", "params": original}] * 3
    teachers = [p["teacher"] for p in progressive.report["phases"]]
    sizes = [original] + [p["params"] for p in progressive.report["phases"]]
    # each phase's student is taught by the previous phase's model: it is at least 5 % of the original larger
    assert teachers == [{"name": "snapshot-original", "params": original},
                        {"name": "snapshot-phase-001", "params": sizes[1]},
                        {"name": "snapshot-phase-002", "params": sizes[2]}]
    assert all((t["params"] - s) / original >= 0.05 for t, s in zip(teachers, sizes[1:]))
    out = Path(progressive.report["settings"]["output"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert all(r["kl"] > 0 and r["layer"] > 0 and "ce" not in r for r in steps)
    assert all(r["loss"] == pytest.approx(r["kl"] + 0.5 * r["layer"]) for r in steps)
    assert [r["name"] for r in records if r["event"] == "snapshot"] == ["snapshot-phase-001", "snapshot-phase-002"]
    assert not Path(str(out) + ".accel").exists()  # snapshots removed with the checkpoints after success
    assert "snapshot-phase-002 (" in format_report(progressive.report)
    assert kd.report["ppl_after"] != progressive.report["ppl_after"]  # the later teachers differ


@pytest.mark.parametrize("mode,checkpoint_every,stop", [("kd", 2, 5), ("progressive", 0, 4), ("progressive", 2, 5)])
def test_distill_resume_matches_uninterrupted(model_dir, tmp_path, distill_reference, mode, checkpoint_every, stop):
    """Killed (by an exception) mid-phase, or at a phase boundary where the next teacher is still to be chosen;
    the resumed run reloads its teacher from the recorded snapshot and ends bitwise equal."""
    kw = {**REF, **distill_settings(mode)}
    cfg = _cfg(model_dir, tmp_path / "cut", checkpoint_every=checkpoint_every, **kw)
    with pytest.raises(Interrupt):
        run(cfg, on_step=_interrupt_at(stop))
    tree = load_trainer_state(latest_checkpoint(cfg.run_dir() / "checkpoints"))
    assert tree["distill"]["snapshots"][0]["name"] == "snapshot-original"
    with pytest.raises(CheckpointError, match="kd_temperature: checkpoint 1.0, now 2.0"):
        run(_cfg(model_dir, tmp_path / "cut", checkpoint_every=checkpoint_every, resume=True, kd_temperature=2.0,
                 **kw))
    resumed = run(_cfg(model_dir, tmp_path / "cut", checkpoint_every=checkpoint_every, resume=True, **kw))
    expected = distill_reference(mode)
    _assert_same_weights(expected.model, resumed.model)
    assert resumed.report["phases"] == expected.report["phases"]


def test_final_stage_distils_from_growing_teachers_and_resumes_exactly(model_dir, tmp_path):
    """--distill-final-tokens: 16 more windows (2 steps) after the 3 phases, the teacher growing from the
    smallest snapshot to the original; interrupted inside that stage, the resumed run ends bitwise equal."""
    kw = {**REF, **distill_settings("progressive"), "distill_final_tokens": 16 * 16, "checkpoint_every": 1}
    whole = run(_cfg(model_dir, tmp_path / "whole", **kw))
    phases = whole.report["phases"]
    assert [p["steps"] for p in phases] == [1, 2, 3, 2]
    assert phases[-1]["params"] == phases[-2]["params"]  # the final stage does not prune
    assert phases[-1]["teacher"]["sequence"] == ["snapshot-phase-002", "snapshot-phase-001", "snapshot-original"]
    records = [json.loads(x) for x in (Path(whole.report["settings"]["output"]) / "metrics.jsonl").read_text()
               .splitlines()]
    final_steps = [r for r in records if r["event"] == "step" and r["phase"] == 3]
    # 2 steps for 3 teachers: the split counts from the end, so the last step is the original's
    assert [r["teacher"] for r in final_steps] == ["snapshot-phase-001", "snapshot-original"]
    assert whole.report["tokens_used"] == (48 + 16) * 16 and whole.report["optimizer_steps"] == 8
    assert "3 snapshots growing to snapshot-original" in format_report(whole.report)
    cfg = _cfg(model_dir, tmp_path / "cut", **kw)
    with pytest.raises(Interrupt):
        run(cfg, on_step=_interrupt_at(7))
    resumed = run(_cfg(model_dir, tmp_path / "cut", resume=True, **kw))
    _assert_same_weights(whole.model, resumed.model)
    with pytest.raises(ValueError, match="--distill progressive"):
        AccelConfig.from_flat(output="o", sparsity=0.5, distill="kd", distill_final_tokens=512).validate()
    with pytest.raises(ValueError, match="give --train-tokens"):
        AccelConfig.from_flat(output="o", sparsity=0.5, distill="progressive", distill_final_tokens=512).validate()


def test_distill_settings_are_checked_before_anything_loads():
    with pytest.raises(ValueError, match="--fsdp"):
        AccelConfig.from_flat(output="o", sparsity=0.5, distill="kd", fsdp=True).validate()
    with pytest.raises(ValueError, match="--distill kd or --distill progressive"):
        AccelConfig.from_flat(output="o", sparsity=0.5, ce_weight=0.5).validate()
    with pytest.raises(ValueError, match="--distill-gap"):
        AccelConfig.from_flat(output="o", sparsity=0.5, distill="progressive", distill_gap=0.0).validate()
    AccelConfig.from_flat(output="o", sparsity=0.5, distill="progressive", ce_weight=0.5).validate()


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(model_dir, tmp_path):
    cfg = _cfg(model_dir, tmp_path / "out", checkpoint_every=2)
    with pytest.raises(Interrupt):
        run(cfg, on_step=_interrupt_at(4))
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.002, now 0.001"):
        run(_cfg(model_dir, tmp_path / "out", checkpoint_every=2, lr=1e-3, resume=True))
    ckpt = latest_checkpoint(cfg.run_dir() / "checkpoints")
    trainer = ckpt / "trainer.safetensors"
    data = bytearray(trainer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    trainer.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        run(_cfg(model_dir, tmp_path / "out", checkpoint_every=2, resume=True))
    shutil.rmtree(cfg.run_dir())
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(_cfg(model_dir, tmp_path / "out", resume=True))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(model_dir, tmp_path, monkeypatch):
    real = accel.train_step
    calls = {"n": 0}

    def poisoned(model, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # first step of phase 3, after the phase-2 boundary checkpoint (step 3)
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(float("nan"))
        return real(model, *args, **kw)

    monkeypatch.setattr(accel, "train_step", poisoned)
    cfg = _cfg(model_dir, tmp_path / "out")
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at phase 3, step 3.*step-000000003"):
        run(cfg)
    ckpt = latest_checkpoint(cfg.run_dir() / "checkpoints")
    assert ckpt.name == "step-000000003"
    model, state = load_checkpoint(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert state["position"] == {"phase": 2, "pruned": False, "step_in_phase": 0, "global_step": 3,
                                 "tokens": 24 * 16}
    assert not Path(cfg.output).exists()


def test_cli_arguments_map_onto_config():
    parser = argparse.ArgumentParser()
    add_accel_arguments(parser)
    args = parser.parse_args(["--output", "o", "--target-params", "1000", "--interleaves", "5",
                              "--reset-optimizer", "--saliency", "train"])
    cfg = config_from_args(args)
    assert (cfg.target_params, cfg.interleaves, cfg.reset_optimizer, cfg.saliency) == (1000, 5, True, "train")
    assert (cfg.global_batch, cfg.lr, cfg.min_lr, cfg.warmup, cfg.decay, cfg.amplitude) == (
        128, 2e-5, 2e-6, 0.05, 0.10, 0.02)  # the paper's settings are the defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--output", "o", "--sparsity", "0.5", "--target-params", "10"])
    with pytest.raises(ValueError, match="exactly one"):
        AccelConfig(output="o").validate()
    with pytest.raises(ValueError, match="--saliency train"):
        AccelConfig.from_flat(output="o", sparsity=0.5, saliency="train", importance="magnitude").validate()


# ---------------------------------------------------------------------------------------------------------
# Distributed: 2 processes (gloo, CPU), DDP and FSDP2, end identical to each other and to one process
# ---------------------------------------------------------------------------------------------------------

WORKER = """
import json, os, sys, torch
from adapt_engine.accel import AccelConfig, run
torch.set_num_threads(1)
for i, (cfg, port) in enumerate(json.loads(sys.argv[1])):
    os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous for each run's process group
    result = run(AccelConfig(**cfg))
    torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"run{i}-rank{os.environ['RANK']}.pt"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(model_dir, tmp_path, reference, distill_reference, slices_reference):
    """The same global batch on 2 gloo ranks, with DDP, with FSDP2 (which also checkpoints mid-phase, gathering
    its shards back), with DDP under --distill progressive (each rank loads the teachers rank 0 snapshots) and with
    DDP under --prune-every (slices between steps, the session rebuilt after each): the ranks end bitwise
    identical, and equal to one process up to the order of the gradient reductions."""
    from dataclasses import asdict

    # 8 calibration samples in batches of 4: one batch per rank, so the summed saliency is the same sum.
    ddp = _cfg(model_dir, tmp_path / "ddp", **REF)
    # FSDP2 shards the gradients, so its prunes use calibration saliency: it gets its own reference.
    fsdp = _cfg(model_dir, tmp_path / "fsdp", micro_batch=2, fsdp=True, checkpoint_every=2)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    progressive = _cfg(model_dir, tmp_path / "progressive", **REF, **distill_settings("progressive"))
    slices = _cfg(model_dir, tmp_path / "slices", **SLICES)
    plan = json.dumps([(asdict(c), _free_port()) for c in (ddp, fsdp, progressive, slices)])
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), plan, str(tmp_path)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errs = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    fsdp_reference = run(_cfg(model_dir, tmp_path / "single", micro_batch=2))
    singles = [reference.model.state_dict(), fsdp_reference.model.state_dict(),
               distill_reference("progressive").model.state_dict(), slices_reference.model.state_dict()]
    for i, (mode, single) in enumerate(zip(("ddp", "fsdp", "progressive", "slices"), singles)):
        r0 = torch.load(tmp_path / f"run{i}-rank0.pt")
        r1 = torch.load(tmp_path / f"run{i}-rank1.pt")
        assert r0.keys() == r1.keys() == single.keys()
        for k in r0:
            assert torch.equal(r0[k], r1[k]), f"{mode}: ranks differ in {k}"
            assert r0[k].shape == single[k].shape, f"{mode} {k}: pruned to {r0[k].shape}, one process {single[k].shape}"
            torch.testing.assert_close(r0[k], single[k], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k, mode=mode: f"{mode} {k}: {m}")
    assert Path(ddp.output, "config.json").is_file() and Path(fsdp.output, "config.json").is_file()  # rank 0 saved


# ---------------------------------------------------------------------------------------------------------
# Issue 10: what a run may delete, and what a resume must refuse
# ---------------------------------------------------------------------------------------------------------


def test_checkpoint_cleanup_removes_only_what_the_run_wrote(model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = _cfg(model_dir, tmp_path / "out", checkpoint_dir=str(ckpt), checkpoint_every=2)

    def drop_a_user_file(rec):
        if rec["global_step"] == 1:
            (ckpt / "notes.txt").write_text("mine")

    run(cfg, on_step=drop_a_user_file)
    assert (ckpt / "notes.txt").read_text() == "mine"  # the folder stays because it holds a file we did not write
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt"]


def test_fresh_start_in_a_foreign_checkpoint_dir_deletes_nothing(model_dir, tmp_path):
    ckpt = tmp_path / "mine"
    ckpt.mkdir()
    (ckpt / "data.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not created by adapt-engine"):
        run(_cfg(model_dir, tmp_path / "out", checkpoint_dir=str(ckpt), overwrite=True))
    assert (ckpt / "data.bin").read_bytes() == b"\x00" * 10


def test_resume_refuses_a_non_empty_output_without_overwrite(model_dir, tmp_path):
    from adapt_engine.errors import OutputPathError

    cfg = _cfg(model_dir, tmp_path / "out", checkpoint_every=2)
    with pytest.raises(Interrupt):
        run(cfg, on_step=_interrupt_at(2))
    Path(cfg.output).mkdir()
    (Path(cfg.output) / "keep.txt").write_text("user data")
    with pytest.raises(OutputPathError, match="not empty; pass --overwrite"):
        run(_cfg(model_dir, tmp_path / "out", checkpoint_every=2, resume=True))
    assert (Path(cfg.output) / "keep.txt").read_text() == "user data"


def test_resume_refuses_changed_micro_batch_and_changed_data(model_dir, tmp_path):
    from pydoc_data import topics

    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)[:80]))
    cfg = _cfg(model_dir, tmp_path / "out", checkpoint_every=1, train_data=str(data), train_tokens=24 * 16,
               val_tokens=0)
    with pytest.raises(Interrupt):
        run(cfg, on_step=_interrupt_at(2))
    with pytest.raises(CheckpointError, match="micro_batch: checkpoint 4, now 2"):
        run(replace(cfg, micro_batch=2, resume=True))
    text = data.read_text()
    data.write_text(text.replace("the", "teh", 1))  # same path, same size, other content
    with pytest.raises(CheckpointError, match="train_data_content"):
        run(replace(cfg, resume=True))
    data.write_text(text)
    os.utime(data, (1, 1))  # touched but unchanged: still resumable
    assert run(replace(cfg, resume=True)).report["optimizer_steps"] == 4


def test_resume_loads_the_pruned_tokenizer_without_a_model_type_warning(model_dir, tmp_path):
    import logging

    cfg = _cfg(model_dir, tmp_path / "out", checkpoint_every=2)
    with pytest.raises(Interrupt):
        run(cfg, on_step=_interrupt_at(2))
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        run(_cfg(model_dir, tmp_path / "out", checkpoint_every=2, resume=True))
    finally:
        hf_logger.removeHandler(handler)
    assert not [m for m in seen if "to instantiate a model of type" in m], seen


def test_accel_for_vllm_resumes_through_merged_and_removed_attention(model_dir, tmp_path):
    """--deploy-target vllm under training: merged K/V moments, NoAttention layers, checkpoints and resume."""
    from adapt_engine.adapters import DecoderAdapter

    kw = dict(sparsity=0.6, deploy_target="vllm", saliency="train", micro_batch=2, checkpoint_every=2)
    whole = run(_cfg(model_dir, tmp_path / "whole", **kw))
    shapes = DecoderAdapter(whole.model).shapes()
    assert shapes[0].num_heads == 6
    assert all((s.num_heads, s.num_kv_heads) in ((0, 0), (6, 2), (6, 1)) for s in shapes)
    assert any(s.num_kv_heads < 2 for s in shapes)  # something was merged or removed
    cfg = _cfg(model_dir, tmp_path / "cut", **kw)
    with pytest.raises(Interrupt):
        run(cfg, on_step=_interrupt_at(5))
    resumed = run(_cfg(model_dir, tmp_path / "cut", resume=True, **kw))
    _assert_same_weights(whole.model, resumed.model)


def test_layers_leaves_the_other_layers_untouched_through_every_phase(model_dir, tmp_path):
    from adapt_engine.saving import load_pruned

    cfg = _cfg(model_dir, tmp_path / "out", layers="1-2", no_checkpoints=True)  # layer 0 stays
    result = run(cfg)
    widths, before = result.report["widths_after"], result.report["widths_before"]
    assert widths[0] == before[0] and widths[1] != before[1] and widths[2] != before[2]
    assert abs(result.report["params_after"] - result.report["target_params"]) < 3 * 48
    assert load_pruned(Path(cfg.output)) is not None
