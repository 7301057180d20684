"""The issue-18 quality levers inside the pruner and the CLI: fresh calibration per sub-step,
importance scaling and compensation flags."""

import json

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine.cli import build_parser, main
from adapt_engine.pruner import AdaptPruner, PruneSettings


def _calib(n=8, length=12, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def test_resample_draws_fresh_windows_every_sub_step_and_fixed_never_does():
    seen = []

    def sampler(step):
        seen.append(step)
        return _calib(seed=100 + step)

    for resample, expected in ((True, [1, 2, 3]), (False, [])):
        seen.clear()
        pruner = AdaptPruner(make_tiny_model("llama"), PruneSettings(steps=4, calib_resample=resample), _calib(),
                             calib_sampler=sampler)
        pruner.prune_to(pruner.target_from_sparsity(0.3))
        assert seen == expected
        assert torch.equal(pruner.calib_ids, _calib(seed=103) if resample else _calib())


def test_resample_changes_the_result_and_fixed_is_reproducible():
    def run(resample):
        model = make_tiny_model("llama")
        pruner = AdaptPruner(model, PruneSettings(steps=3, calib_resample=resample), _calib(),
                             calib_sampler=lambda i: _calib(seed=50 + i))
        pruner.prune_to(pruner.target_from_sparsity(0.4))
        return [h["layer_importance_raw"] for h in pruner.history]

    assert run(False) == run(False)
    assert run(True) != run(False)


def test_resample_without_a_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="calib_sampler"):
        AdaptPruner(make_tiny_model("llama"), PruneSettings(calib_resample=True), _calib())


@pytest.mark.parametrize(("settings", "can_resample", "in_memory", "expected"), [
    ({}, True, True, (True, 1.0, 0.1)),  # the CLI's random windows, in memory: redraw, carry, lighter ridge
    ({}, True, False, (True, 0.0, 0.3)),  # --offload layer keeps no statistics between sub-steps
    ({}, False, True, (False, 0.0, 0.3)),  # fixed windows (--calib-indices, search trials, accel)
    ({"calib_resample": False}, True, True, (False, 0.0, 0.3)),
    ({"compensate": "none"}, True, True, (True, 0.0, 0.3)),
    ({"compensate_damp": 1.0}, True, True, (True, 1.0, 1.0)),
    ({"compensate_carry": 0.5}, True, True, (True, 0.5, 0.1)),
    ({"compensate_carry": 0.0}, True, True, (True, 0.0, 0.3)),
])
def test_refit_defaults_follow_their_rule_and_explicit_values_win(settings, can_resample, in_memory, expected):
    assert PruneSettings(**settings).resolved_refit(can_resample, in_memory) == expected


def test_default_prune_resamples_and_carries_in_memory_only(tmp_path, tiny_model_dir):
    """The report names the values the run used; --no-calib-resample turns the redraw (and so the carry) off."""
    used = {}
    for name, extra in (("memory", []), ("layer", ["--offload", "layer"]), ("fixed", ["--no-calib-resample"])):
        out = tmp_path / name
        assert main(["prune", "--model", str(tiny_model_dir), "--output", str(out), "--steps", "2", "--sparsity",
                     "0.3", "--calib-samples", "8", "--calib-seq-len", "16", "--eval-tokens", "0", "--no-bench",
                     *extra]) == 0
        s = json.loads((out / "pruning_report.json").read_text())["settings"]
        used[name] = (s["calib_resample"], s["compensate_carry"], s["compensate_damp"])
    assert used == {"memory": (True, 1.0, 0.1), "layer": (True, 0.0, 0.3), "fixed": (False, 0.0, 0.3)}
    parse = build_parser().parse_args
    base = ["prune", "--output", "x", "--sparsity", "0.2"]
    assert [parse(base + f).calib_resample for f in ([], ["--calib-resample"], ["--no-calib-resample"])] == \
        [None, True, False]


@pytest.mark.parametrize("field,value,flag", [("compensate", "ols", "--compensate"),
                                              ("compensate_damp", -0.1, "--compensate-damp"),
                                              ("importance_scale", "zscore", "--importance-scale")])
def test_bad_lever_settings_name_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        PruneSettings(**{field: value}).validate()


def test_importance_scale_reaches_the_allocation():
    records = {}
    for scale in ("max", "rank"):
        pruner = AdaptPruner(make_tiny_model("llama", layers=4), PruneSettings(steps=1, importance_scale=scale),
                             _calib())
        records[scale] = pruner.prune_to(pruner.target_from_sparsity(0.3))[0]
    assert sorted(records["rank"]["layer_importance"]) == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])
    assert records["max"]["layer_importance_raw"] == records["rank"]["layer_importance_raw"]


def test_cli_flags_parse_with_documented_defaults():
    args = build_parser().parse_args(["prune", "--output", "x", "--sparsity", "0.2"])
    assert (args.compensate, args.compensate_damp, args.calib_resample, args.importance_scale) == \
        (PruneSettings.compensate, PruneSettings.compensate_damp, PruneSettings.calib_resample,
         PruneSettings.importance_scale)
    args = build_parser().parse_args(["prune", "--output", "x", "--sparsity", "0.2", "--compensate", "lstsq",
                                      "--compensate-damp", "0.1", "--calib-resample", "--importance-scale", "robust"])
    assert (args.compensate, args.compensate_damp, args.calib_resample, args.importance_scale) == \
        ("lstsq", 0.1, True, "robust")


def test_cli_prune_with_every_lever(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_model_dir), "--output", str(out), "--steps", "3", "--calib-samples",
                 "8", "--calib-seq-len", "16", "--eval-tokens", "0", "--no-bench", "--sparsity", "0.3",
                 "--compensate", "lstsq", "--calib-resample", "--importance-scale", "robust"]) == 0
    settings = json.loads((out / "pruning_report.json").read_text())["settings"]
    assert (settings["compensate"], settings["calib_resample"], settings["importance_scale"]) == \
        ("lstsq", True, "robust")
    # bias on a model without o/down biases: a clear message and exit code 2
    assert main(["prune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "b"), "--steps", "1",
                 "--calib-samples", "8", "--calib-seq-len", "16", "--eval-tokens", "0", "--no-bench", "--sparsity",
                 "0.3", "--compensate", "bias"]) == 2
    assert "no bias on o_proj and down_proj" in capsys.readouterr().err
