"""`adapt-engine search` (AdaPruner) on a tiny local model: the study, best.json, `prune --from-search`, and a
killed search resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from adapt_engine.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _search_argv(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "--model", str(model_dir), "--output", str(out), "--sparsity", "0.3", "--calib-k", "3",
            "--calib-seq-len", "16", "--objective-tokens", "256", "--sampler", "random", *extra]


def _study(out: Path):
    return optuna.load_study(study_name="adapt-engine-search", storage=f"sqlite:///{out / 'study.db'}")


def test_search_writes_best_and_prune_from_search_redoes_the_best_trial(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "search"
    assert main(_search_argv(tiny_model_dir, out, "--trials", "3")) == 0
    best = json.loads((out / "best.json").read_text())
    trials = [t for t in _study(out).trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 3 and best["trials_complete"] == 3
    assert best["objective"] == min(t.value for t in trials)
    winner = next(t for t in trials if t.number == best["trial"])
    assert best["calib_indices"] == [winner.params[f"calib_{i}"] for i in range(3)]
    assert best["prune"]["importance"] == winner.params["importance"]
    assert best["prune"]["aggregate"] == winner.params["aggregate"]
    if winner.params["importance"] == "mix":
        assert best["prune"]["mix_alpha"] == [winner.params["alpha_vector"], winner.params["alpha_element"]]
    assert best["prune"]["steps"] == 1 and all(t.user_attrs["seconds"] > 0 for t in trials)
    assert (out / "search.png").stat().st_size > 1000

    same = tmp_path / "same"
    assert main(["prune", "--model", str(tiny_model_dir), "--from-search", str(out / "best.json"), "--sparsity",
                 "0.3", "--steps", "1", "--output", str(same), "--eval-tokens", "256", "--no-bench"]) == 0
    report = json.loads((same / "pruning_report.json").read_text())
    assert report["validation_ppl"] == best["objective"]  # the trial, redone exactly
    assert report["settings"]["calib_indices"] == best["calib_indices"]
    assert report["settings"]["mix_scale"] == best["prune"]["mix_scale"]

    full = tmp_path / "full"
    assert main(["prune", "--model", str(tiny_model_dir), "--from-search", str(out / "best.json"), "--sparsity",
                 "0.3", "--steps", "3", "--output", str(full), "--eval-tokens", "256", "--no-bench"]) == 0
    report = json.loads((full / "pruning_report.json").read_text())
    assert len(report["history"]) == 3 and report["validation_ppl"] != best["objective"]

    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_model_dir), "--from-search", str(out / "best.json"), "--sparsity",
                 "0.3", "--amplitude", "0.05", "--output", str(tmp_path / "x"), "--no-bench"]) == 2
    assert "drop --amplitude" in capsys.readouterr().err


def test_existing_study_needs_resume_and_the_same_settings(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "search"
    assert main(_search_argv(tiny_model_dir, out, "--trials", "1")) == 0
    capsys.readouterr()
    assert main(_search_argv(tiny_model_dir, out, "--trials", "2")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_search_argv(tiny_model_dir, out, "--trials", "2", "--resume", "--calib-k", "4")) == 2
    assert "calib_k" in capsys.readouterr().err
    assert main(_search_argv(tiny_model_dir, out, "--trials", "2", "--resume")) == 0
    assert len(_study(out).trials) == 2
    assert main(_search_argv(tiny_model_dir, out, "--trials", "1", "--overwrite")) == 0
    assert len(_study(out).trials) == 1


def test_killed_search_resumes_from_the_stored_trials(tmp_path, tiny_model_dir):
    out = tmp_path / "search"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adapt_engine.cli", *_search_argv(tiny_model_dir, out, "--trials",
                                                                                      "500")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        done = 0
        # Watch best.json (rewritten atomically after every completed trial), not the database: opening the
        # SQLite storage while the search creates its schema races it (both insert the schema version).
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "best.json").exists():
                done = json.loads((out / "best.json").read_text())["trials_complete"]
                if done >= 3:
                    break
            time.sleep(0.2)
        assert done >= 3, "the search completed no trials in time"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t.number: (t.value, t.params) for t in _study(out).trials if t.state == TrialState.COMPLETE}
    target = len(before) + 2
    assert main(_search_argv(tiny_model_dir, out, "--trials", str(target), "--resume")) == 0
    trials = _study(out).trials
    after = {t.number: (t.value, t.params) for t in trials if t.state == TrialState.COMPLETE}
    assert len(after) == target
    assert all(after[n] == before[n] for n in before)  # the stored trials are kept as they were
    assert min(n for n in after if n not in before) > max(before)  # and the study continued after them
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # the killed trial (if any) is marked failed
    assert json.loads((out / "best.json").read_text())["trials_complete"] == target


def _open_at_once(folders: list[str], barrier, results) -> None:
    """One of several processes opening the same new study at the same moment, round after round."""
    from adapt_engine.args import SearchSettings, SizeSettings
    from adapt_engine.search import _open_study

    for folder in folders:
        barrier.wait()
        try:
            study = _open_study(SearchSettings(output=folder, size=SizeSettings(sparsity=0.2), resume=True))
            results.put((folder, study.user_attrs["search"]["sparsity"]))
        except Exception as err:  # reported to the test, which names it
            results.put((folder, f"{type(err).__name__}: {err}"))


def test_processes_starting_together_on_a_new_database_share_one_study(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    folders = [str(tmp_path / f"round{r}") for r in range(4)]
    for folder in folders:
        Path(folder).mkdir()
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(folders, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(3 * len(folders))]
    for p in procs:
        p.join(timeout=60)
    assert [value for _, value in got] == [0.2] * len(got), got
    assert sorted(f for f, _ in got) == sorted(f for f in folders for _ in range(3))
    for folder in folders:
        study = optuna.load_study(study_name="adapt-engine-search", storage=f"sqlite:///{folder}/study.db")
        assert study.user_attrs["search"]["sparsity"] == 0.2


def test_the_search_space_offers_taylor_and_the_blend(tmp_path):
    from adapt_engine.args import PruneSettings
    from adapt_engine.search import settings_from_params, trial_settings

    base = PruneSettings()
    seen = set()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        settings, indices = trial_settings(trial, base, 3, 50)
        seen.add(settings.importance)
        assert len(indices) == 3 and all(0 <= i < 50 for i in indices)
        if settings.importance == "taylor":  # the blend's weights are not sampled for taylor
            assert "mix_scale" not in trial.params and settings.mix_alpha == base.mix_alpha
        study.tell(trial, 1.0)
    assert seen == {"mix", "taylor"}
    # a version-1 best.json's parameters (no "importance") stand for the blend
    old = settings_from_params(base, {"alpha_vector": 0.5, "alpha_element": 0.25, "mix_scale": 2.0,
                                      "aggregate": "max"})
    assert (old.importance, old.mix_alpha, old.mix_scale, old.aggregate) == ("mix", [0.5, 0.25], 2.0, "max")
