"""`adapt-engine search`: AdaPruner's Bayesian search (seeds/002) over which calibration windows a prune uses and
how its importance metric is blended; the objective is the validation perplexity of the pruned, untrained model.

Each trial picks ``--calib-k`` windows of the calibration pool, the Eq. 5 weights ``α1, α2``, the alignment factor
``s`` and the aggregation over a group's members, prunes a copy of the model (restored from the original kept once
in memory, never reloaded from disk) in ``--steps`` sub-steps, and scores it on the validation split. Optuna
samples (TPE or random) and keeps the study in an RDB storage, so a killed search resumes and several processes
share one study. ``best.json`` holds everything ``prune --from-search`` needs to redo the best trial.
"""

from __future__ import annotations

import copy
import itertools
import os
import socket
import statistics
import sys
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from .adapters import count_params
from .args import AGGREGATES, CalibSettings, PruneRunSettings, PruneSettings, SearchSettings
from .data import DataError, load_text, objective_text, pool_windows, read_calib_indices, select_windows, tokenize_text
from .errors import OutputPathError, UsageError
from .evaluate import perplexity
from .fsio import OUTPUT_MARKER, atomic_write, atomic_write_json, preflight_output, process_alive
from .models import load_model
from .pruner import AdaptPruner

BEST_NAME = "best.json"
PLOT_NAME = "search.png"
# 2: the metric itself is searched (Eq. 5's blend or our default `taylor`); best.json files of version 1 still load.
SEARCH_VERSION = 2
READABLE_VERSIONS = (1, 2)
# The metrics a trial chooses between: AdaPruner's Eq. 5 blend, and Σ|w·g| (the blend's space lacks it, and
# random calibration draws scored with it beat the best blend of a 20-trial search: docs/search.md).
SEARCH_METRICS = ("mix", "taylor")
# The alignment factor s of Eq. 5, searched log-uniformly: the element-wise term's magnitude differs from the
# vector term's by orders (the paper searches e-4 to e7 in a few categories).
MIX_SCALE_RANGE = (1e-4, 1e4)
# Optuna's heartbeat: a trial whose process died on any machine is failed after this long without a beat.
HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 180
# Attempts to open a study that other processes are creating at the same moment (see `_open_study`).
OPEN_ATTEMPTS = 6
# How long a running trial may go without naming its process before a resuming search takes it for an orphan.
ORPHAN_SECONDS = 5.0


def objective_ppl(model, ids: torch.Tensor) -> float:
    """The search objective, and `prune --from-search`'s validation perplexity: perplexity over windows of up to
    512 tokens, as the prune report measures held-out perplexity."""
    return perplexity(model, ids, seq_len=min(512, ids.numel()), batch_size=4)["ppl"]


def objective_ids(tokenizer, objective_data: str | None, calib_pool: str | None, tokens: int) -> torch.Tensor:
    """The first ``tokens`` validation tokens (an error, not a silent cut, when there are fewer)."""
    ids = tokenize_text(tokenizer, objective_text(objective_data, calib_pool))
    if ids.numel() < tokens:
        raise DataError(f"the validation text has {ids.numel()} tokens, fewer than --objective-tokens {tokens}; "
                        f"lower --objective-tokens or pass a longer --objective-data")
    return ids[:tokens]


def trial_settings(trial, base: PruneSettings, k: int, windows: int) -> tuple[PruneSettings, list[int]]:
    """The prune settings and calibration window indices one trial samples (the search space)."""
    import optuna

    indices = [trial.suggest_int(f"calib_{i}", 0, windows - 1) for i in range(k)]
    metric = trial.suggest_categorical("importance", list(SEARCH_METRICS))
    if metric == "mix":  # Eq. 5's weights and scale exist only for the blend (conditional parameters)
        trial.suggest_float("alpha_vector", 0.0, 1.0)
        trial.suggest_float("alpha_element", 0.0, 1.0)
        trial.suggest_float("mix_scale", *MIX_SCALE_RANGE, log=True)
    trial.suggest_categorical("aggregate", list(AGGREGATES))
    settings = settings_from_params(base, trial.params)
    if metric == "mix" and max(settings.mix_alpha) <= 0.0:  # no metric at all: nothing to score
        raise optuna.TrialPruned("both Eq. 5 weights are 0")
    return settings, indices


def settings_from_params(base: PruneSettings, params: dict) -> PruneSettings:
    """The prune settings a trial's parameters stand for (a version-1 study's trials are all `mix`)."""
    metric = params.get("importance", "mix")
    if metric == "mix":
        return replace(base, importance="mix", mix_alpha=[params["alpha_vector"], params["alpha_element"]],
                       mix_scale=params["mix_scale"], aggregate=params["aggregate"])
    return replace(base, importance=metric, aggregate=params["aggregate"])


def describe(settings: PruneSettings) -> str:
    """One trial's metric in a few words, for the progress lines."""
    if settings.importance == "mix":
        return (f"mix {settings.mix_alpha[0]:.3f},{settings.mix_alpha[1]:.3f}, s {settings.mix_scale:.3g}, "
                f"{settings.aggregate}")
    return f"{settings.importance}, {settings.aggregate}"


class _Searcher:
    """The loaded model (kept once), the calibration pool, the validation tokens, and one trial's work."""

    def __init__(self, cfg: SearchSettings):
        self.cfg = cfg
        self.original, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.windows = pool_windows(tokenize_text(tokenizer, load_text(cfg.calib_pool, "pool")), cfg.calib_seq_len)
        self.val_ids = objective_ids(tokenizer, cfg.objective_data, cfg.calib_pool, cfg.objective_tokens)
        self.seconds: list[float] = []

    def objective(self, trial) -> float:
        """Restore, prune with the trial's settings, score on the validation split."""
        t0 = time.perf_counter()
        cfg = self.cfg
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        settings, indices = trial_settings(trial, cfg.prune, cfg.calib_k, self.windows.shape[0])
        model = copy.deepcopy(self.original)  # the original weights stay untouched in memory
        torch.manual_seed(settings.seed)  # as `prune` does, so --from-search redoes this trial exactly
        pruner = AdaptPruner(model, settings, select_windows(self.windows, indices))
        target = cfg.target_params if cfg.target_params is not None else pruner.target_from_sparsity(cfg.sparsity)
        pruner.prune_to(target)
        value = objective_ppl(model, self.val_ids)
        seconds = time.perf_counter() - t0
        self.seconds.append(seconds)
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("params_after", count_params(model))
        print(f"trial {trial.number}: validation ppl {value:.4f} ({seconds:.1f} s; {describe(settings)})",
              file=sys.stderr)
        return value


def _check_output(cfg: SearchSettings) -> Path:
    """--output writable before the model loads; with --resume an earlier search folder is expected."""
    out = Path(cfg.output).expanduser().absolute()
    protect = [cfg.model] if cfg.model and Path(cfg.model).expanduser().exists() else []
    if out.is_dir() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise OutputPathError(f"--output '{cfg.output}' is not empty; pass --resume to continue the search in it, "
                              f"--overwrite to start afresh, or another --output")
    # --resume and --overwrite accept a non-empty folder, but only one adapt-engine wrote
    preflight_output(out, overwrite=cfg.resume or cfg.overwrite, protect=protect)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / OUTPUT_MARKER).exists():
        atomic_write(out / OUTPUT_MARKER, '{"written_by": "adapt-engine", "kind": "search"}\n')
    return out


def _study_record(cfg: SearchSettings) -> dict:
    """The settings a study was made with: a resumed or joining process must use the same."""
    return {"model": cfg.model, "dtype": cfg.dtype, "sparsity": cfg.sparsity, "target_params": cfg.target_params,
            "calib_pool": cfg.calib_pool, "calib_k": cfg.calib_k, "calib_seq_len": cfg.calib_seq_len,
            "objective_data": cfg.objective_data, "objective_tokens": cfg.objective_tokens,
            "prune": asdict(cfg.prune), "search_version": SEARCH_VERSION}


def _open_study(cfg: SearchSettings):
    """The study in --storage: created, replaced (--overwrite) or continued (--resume), never mixed up."""
    import sqlalchemy.exc

    for attempt in itertools.count(1):
        try:
            return _open_study_once(cfg)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            # Processes started at the same moment on a new database each create its schema, the study and its
            # settings record; a loser of that race finds a row or table another just wrote (or SQLite's write
            # lock) and, trying again, the finished study. Anything else is raised as it is.
            racing = isinstance(err, sqlalchemy.exc.IntegrityError) or any(
                sign in str(err) for sign in ("locked", "already exists"))
            if not racing or attempt == OPEN_ATTEMPTS:
                raise
            time.sleep(0.25 * attempt)
    raise AssertionError("unreachable")


def _open_study_once(cfg: SearchSettings):
    """One attempt of `_open_study`."""
    import optuna

    with warnings.catch_warnings():  # the heartbeat is marked experimental; it is what fails trials of dead hosts
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(cfg.storage_url, heartbeat_interval=HEARTBEAT_SECONDS,
                                             grace_period=GRACE_SECONDS)
    exists = cfg.study_name in optuna.get_all_study_names(storage)
    if exists and cfg.overwrite:
        optuna.delete_study(study_name=cfg.study_name, storage=storage)
        exists = False
    if exists and not cfg.resume:
        raise UsageError(f"study '{cfg.study_name}' already exists in {cfg.storage_url}; pass --resume to continue "
                         f"it (or to join a running search), or --overwrite to start afresh")
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, direction="minimize",
                                load_if_exists=True)
    record = _study_record(cfg)
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", record)
    elif stored != record:
        changed = sorted(k for k in record if stored.get(k) != record.get(k))
        raise UsageError(f"study '{cfg.study_name}' was made with other settings ({', '.join(changed)} differ); "
                         f"resume it with the same flags, or use another --study-name or --storage")
    _fail_dead_local_trials(study, storage)
    # A new seed per start (seed + trials so far): a resumed random sampler must not replay its first proposals.
    seed = cfg.seed + len(study.trials)
    study.sampler = (optuna.samplers.TPESampler(seed=seed) if cfg.sampler == "tpe"
                     else optuna.samplers.RandomSampler(seed=seed))
    return study


def _fail_dead_local_trials(study, storage) -> None:
    """Mark FAIL the running trials of this machine whose process is gone (a killed search), at once; the heartbeat
    does the same for other machines after GRACE_SECONDS."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") == host and pid is not None and not process_alive(pid):
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # FrozenTrial keeps its id private
    # A process killed between Optuna creating its trial and the objective naming its host and pid leaves a trial
    # that names nobody. A live process names its trial within milliseconds: one still anonymous after a pause
    # is an orphan.
    anonymous = {t.number for t in running if "pid" not in t.user_attrs}
    if anonymous:
        time.sleep(ORPHAN_SECONDS)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number in anonymous and "pid" not in trial.user_attrs:
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def complete_trials(study) -> list:
    """The study's completed trials in trial-number order."""
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def best_record(cfg: SearchSettings, study) -> dict:
    """best.json: the best trial's objective and everything `prune --from-search` needs to redo it."""
    import sqlalchemy

    done = complete_trials(study)
    best = min(done, key=lambda t: (t.value, t.number))
    k = cfg.calib_k
    settings = settings_from_params(cfg.prune, best.params)
    seconds = [t.user_attrs["seconds"] for t in done if "seconds" in t.user_attrs]
    values = [t.value for t in done]
    size = f"--sparsity {cfg.sparsity}" if cfg.sparsity is not None else f"--target-params {cfg.target_params}"
    return {
        "search_version": SEARCH_VERSION, "objective": best.value, "objective_name": "validation perplexity",
        "trial": best.number, "trials_complete": len(done), "sampler": cfg.sampler, "study_name": cfg.study_name,
        "storage": sqlalchemy.engine.make_url(cfg.storage_url).render_as_string(hide_password=True),
        "model": cfg.model, "dtype": cfg.dtype, "sparsity": cfg.sparsity, "target_params": cfg.target_params,
        "calib_data": cfg.calib_pool, "calib_seq_len": cfg.calib_seq_len,
        "calib_indices": [best.params[f"calib_{i}"] for i in range(k)],
        "objective_data": cfg.objective_data, "objective_tokens": cfg.objective_tokens,
        "prune": asdict(settings), "seconds_per_trial_median": statistics.median(seconds) if seconds else None,
        "best_so_far": [[t.number, v] for t, v in zip(done, itertools.accumulate(values, min))],
        "reproduce": f"adapt-engine prune --from-search {Path(cfg.output) / BEST_NAME} {size} "
                     f"--steps {cfg.prune.steps} --output OUT",
    }


def write_outputs(cfg: SearchSettings, study) -> dict | None:
    """best.json and the best-so-far plot, each written atomically (None before any trial completed)."""
    if not complete_trials(study):
        return None
    record = best_record(cfg, study)
    out = Path(cfg.output).expanduser()
    atomic_write_json(out / BEST_NAME, record)
    atomic_write(out / PLOT_NAME, lambda tmp: _plot(record, cfg, tmp))
    return record


def _plot(record: dict, cfg: SearchSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [n for n, _ in record["best_so_far"]]
    best = [v for _, v in record["best_so_far"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.step(numbers, best, where="post", label=f"best so far ({cfg.sampler})")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"adapt-engine search: {cfg.sampler}, {record['trials_complete']} completed trials")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def run_search(cfg: SearchSettings) -> dict | None:
    """Check, open the study, load the model once, run trials until the study holds --trials completed ones."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    cfg.validate()
    _check_output(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    study = _open_study(cfg)
    remaining = cfg.trials - len(complete_trials(study))
    if remaining > 0:
        searcher = _Searcher(cfg)
        if searcher.windows.shape[0] < 2:
            raise DataError(f"the calibration pool has {searcher.windows.shape[0]} window of {cfg.calib_seq_len} "
                            f"tokens; a search needs a pool to choose from. Pass more text as --calib-pool")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        print(f"search: {remaining} more trials ({cfg.sampler}) over {searcher.windows.shape[0]} pool windows x "
              f"{cfg.calib_seq_len} tokens, objective on {searcher.val_ids.numel()} validation tokens; "
              f"study '{cfg.study_name}' in {cfg.storage_url}", file=sys.stderr)
        study.optimize(searcher.objective, n_trials=remaining,
                       callbacks=[MaxTrialsCallback(cfg.trials, states=(TrialState.COMPLETE,)),
                                  lambda s, _t: write_outputs(cfg, s)])
    record = write_outputs(cfg, study)
    if record is not None:
        print(f"best: trial {record['trial']}, validation ppl {record['objective']:.4f} after "
              f"{record['trials_complete']} trials; {Path(cfg.output) / BEST_NAME}\n  {record['reproduce']}")
    return record


def apply_search_result(cfg: PruneRunSettings) -> PruneRunSettings:
    """`prune --from-search BEST_JSON`: the best trial's prune settings, calibration data, sequence length and
    windows; --steps and the size stay the user's. A flag set to something else than the search used is an
    error, not silently replaced."""
    import json

    try:
        best = json.loads(Path(cfg.from_search).read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"--from-search {cfg.from_search}: cannot read it ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise UsageError(f"--from-search {cfg.from_search} is not valid JSON ({err})") from err
    if not isinstance(best, dict) or best.get("search_version") not in READABLE_VERSIONS or "prune" not in best:
        raise UsageError(f"--from-search {cfg.from_search} is not a best.json written by `adapt-engine search`")
    read_calib_indices(cfg.from_search)  # checks the indices
    defaults = PruneSettings()
    searched = PruneSettings(**{**best["prune"], "steps": cfg.prune.steps})
    for f in fields(PruneSettings):
        if f.name != "steps":
            _refuse_override(f.name, getattr(cfg.prune, f.name), getattr(defaults, f.name), getattr(searched, f.name))
    calib = cfg.calib
    for name in ("calib_data", "calib_seq_len"):
        _refuse_override(name, getattr(calib, name), getattr(CalibSettings(), name), best[name])
    if cfg.calib_indices is not None:
        raise UsageError("--from-search sets the calibration windows; drop --calib-indices")
    calib = replace(calib, calib_data=best["calib_data"], calib_seq_len=best["calib_seq_len"])
    return replace(cfg, prune=searched, calib=calib, calib_indices=cfg.from_search)


def _refuse_override(name: str, mine, default, theirs) -> None:
    """A UsageError when the user set flag ``name`` (away from its default) to something else than the search used."""
    if mine != default and mine != theirs:
        flag = f"--{name.replace('_', '-')}"
        raise UsageError(f"--from-search sets {flag} to {theirs!r} (the search's); drop {flag} {mine!r}")


def search_validation(cfg: PruneRunSettings, tokenizer) -> tuple[torch.Tensor, float]:
    """The validation tokens of the search `--from-search` names (its objective's text and length), and the best
    trial's objective on them."""
    import json

    best = json.loads(Path(cfg.from_search).read_text(encoding="utf-8"))
    ids = objective_ids(tokenizer, best["objective_data"], best["calib_data"], best["objective_tokens"])
    return ids, best["objective"]
