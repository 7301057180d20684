"""Settings declared once: flags, defaults, bounds, nested settings and the resume fingerprint all come from
the dataclass fields."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import pytest

from adapt_engine.accel import AccelConfig
from adapt_engine.commands import PruneRunSettings
from adapt_engine.errors import UsageError
from adapt_engine.pruner import PruneSettings
from adapt_engine.settings import (
    CommandSettings,
    add_flags,
    check_bounds,
    flat_dict,
    from_args,
    math_fingerprint,
    nested,
    setting,
)


def _parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return from_args(cls, parser.parse_args(argv))


def test_nested_settings_are_built_from_flat_flags():
    cfg = _parse(AccelConfig, ["--output", "o", "--sparsity", "0.3", "--amplitude", "0.05", "--micro-batch", "2"])
    assert isinstance(cfg.prune, PruneSettings) and cfg.prune.amplitude == 0.05 and cfg.amplitude == 0.05
    assert cfg.micro_batch == 2 and cfg.size.sparsity == 0.3 and cfg.loading.device == "cpu"
    assert cfg.calib_samples == 128  # accel's own default for the shared calibration settings
    assert _parse(PruneRunSettings, ["--output", "o", "--sparsity", "0.3"]).calib_samples == 512
    with pytest.raises(SystemExit):  # --steps belongs to prune; accel has --prune-steps
        _parse(AccelConfig, ["--output", "o", "--sparsity", "0.3", "--steps", "3"])


def test_from_flat_and_asdict_round_trip():
    cfg = AccelConfig.from_flat(output="o", sparsity=0.2, importance="magnitude", calib_seq_len=32, lr=1e-3)
    assert (cfg.prune.importance, cfg.calib.calib_seq_len, cfg.lr) == ("magnitude", 32, 1e-3)
    assert AccelConfig(**asdict(cfg)) == cfg  # nested dicts (e.g. read back from JSON) become dataclasses
    with pytest.raises(TypeError, match="no setting steps"):
        AccelConfig.from_flat(output="o", steps=3)
    with pytest.raises(AttributeError):
        _ = cfg.no_such_setting


def test_fingerprint_holds_exactly_the_math_fields():
    fp = math_fingerprint(AccelConfig.from_flat(output="o", sparsity=0.2))
    assert {"micro_batch", "calib_batch_size", "lr", "amplitude", "seed", "model", "dtype", "sparsity"} <= set(fp)
    assert not {"output", "device", "val_tokens", "checkpoint_every", "resume", "overwrite", "threads",
                "optimizer", "no_bench", "steps"} & set(fp)
    assert "train_data_content" in AccelConfig.from_flat(output="o", sparsity=0.2).fingerprint()


def test_report_settings_keep_the_flat_names():
    names = set(flat_dict(AccelConfig.from_flat(output="o", sparsity=0.2)))
    assert {"amplitude", "prune_steps", "calib_samples", "micro_batch", "device", "output"} <= names
    assert "steps" not in names and "calib_data" not in names


def test_bounds_and_choices_name_the_flag():
    with pytest.raises(UsageError, match=r"--calib-batch-size must be at least 1, got 0"):
        check_bounds(PruneSettings(calib_batch_size=0))
    with pytest.raises(UsageError, match="--importance must be one of taylor, magnitude"):
        PruneSettings(importance="bogus").validate()
    with pytest.raises(UsageError, match="exactly one of --sparsity"):
        AccelConfig(output="o").validate()


@dataclass
class Knobs(PruneSettings):
    """PruneSettings with one more field, as a new prune setting would be added."""

    warm_start: int = setting(3, minimum=0, help="sub-steps of warm start")


@dataclass
class Command(CommandSettings):
    """A command that nests the settings."""

    prune: Knobs = nested(Knobs)


def test_one_new_field_is_a_flag_a_bound_and_a_resume_check():
    """What adding a prune setting takes: one field (here on a subclass, to leave the real one alone)."""
    parser = argparse.ArgumentParser()
    add_flags(parser, Command)
    assert "--warm-start" in parser.format_help() and "--amplitude" in parser.format_help()
    cfg = from_args(Command, parser.parse_args(["--warm-start", "5"]))
    assert cfg.warm_start == 5 and math_fingerprint(cfg)["warm_start"] == 5
    with pytest.raises(UsageError, match="--warm-start must be at least 0"):
        check_bounds(from_args(Command, parser.parse_args(["--warm-start", "-1"])))
