"""`adapt-engine prune` and `adapt-engine eval` as a user runs them, on a tiny local model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapt_engine.cli import main
from adapt_engine.saving import load_pruned


def _prune_args(model_dir, out, *extra):
    return ["prune", "--model", str(model_dir), "--output", str(out), "--steps", "2", "--calib-samples", "8",
            "--calib-seq-len", "16", "--eval-tokens", "256", "--no-bench", *extra]


def test_prune_then_eval(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "pruned"
    assert main(_prune_args(tiny_model_dir, out, "--sparsity", "0.3")) == 0
    printed = capsys.readouterr().out
    assert "adapt-engine prune report" in printed and "perplexity" in printed
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert len(report["history"]) == 2 and len(report["history"][0]["layer_importance"]) == 3
    assert (out / "pruning_report.png").stat().st_size > 1000
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in stock.parameters()) == report["params_after"]

    assert main(["eval", "--model", str(out), "--seq-len", "64", "--max-tokens", "512"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ppl", "params", "tokens"} <= set(line) and line["params"] == report["params_after"]
    assert line["tokens"] == 8 * 63


def test_target_params_and_round_to(tmp_path, tiny_model_dir):
    dense = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    out = tmp_path / "p2"
    target = dense - 20000
    assert main(_prune_args(tiny_model_dir, out, "--target-params", str(target), "--round-to", "8",
                            "--importance", "magnitude", "--allocation", "uniform")) == 0
    model = load_pruned(out)
    assert all(layer.mlp.gate_proj.out_features % 8 == 0 for layer in model.model.layers)
    assert abs(sum(p.numel() for p in model.parameters()) - target) <= 3 * 48 * 8


def test_bad_input_gets_clear_errors(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "x"
    assert main(_prune_args(tiny_model_dir, out, "--sparsity", "1.5")) == 2
    assert "--sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(_prune_args(tiny_model_dir, out, "--sparsity", "0.2", "--calib-samples", "100000")) == 2
    assert "not enough text" in capsys.readouterr().err
    assert not out.exists()
    assert main(_prune_args(tmp_path / "missing", out, "--sparsity", "0.2")) == 2
    with pytest.raises(SystemExit):  # argparse: one of --sparsity/--target-params is required
        main(["prune", "--output", str(out)])


def test_eval_counts_tokens(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(text), "--seq-len", "32"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["ppl"] > 1 and line["tokens"] > 0
    assert torch.isfinite(torch.tensor(line["ppl"]))


def test_pruned_output_can_be_pruned_again(tmp_path, tiny_model_dir):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(_prune_args(tiny_model_dir, first, "--sparsity", "0.2")) == 0
    assert main(_prune_args(first, second, "--sparsity", "0.2")) == 0
    a = json.loads((first / "pruning_report.json").read_text())
    b = json.loads((second / "pruning_report.json").read_text())
    assert b["params_before"] == a["params_after"] > b["params_after"]
    assert load_pruned(second).config.layer_intermediate_sizes == [w["intermediate_size"] for w in b["widths_after"]]


def test_prune_prints_measured_speedup(tmp_path, tiny_model_dir, capsys):
    args = [a for a in _prune_args(tiny_model_dir, tmp_path / "s", "--sparsity", "0.4") if a != "--no-bench"]
    assert main(args) == 0
    assert "speedup" in capsys.readouterr().out.lower()


def test_accel_ends_like_prune_with_the_measured_speedup(tmp_path, tiny_model_dir, capsys):
    from report_cases import accel_argv

    argv = [a for a in accel_argv(tiny_model_dir, tmp_path / "a") if a != "--no-bench"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "adapt-engine accel report" in out and "speedup" in out.lower()
    assert (tmp_path / "a" / "pruning_report.png").stat().st_size > 1000


def test_prune_for_vllm_reprunes_and_exports_without_padding(tmp_path, tiny_model_dir, capsys):
    first, second, served = tmp_path / "a", tmp_path / "b", tmp_path / "served"
    args = [a for a in _prune_args(tiny_model_dir, first, "--sparsity", "0.6", "--deploy-target", "vllm")
            if a != "--no-bench"]
    assert main(args) == 0
    assert main(_prune_args(first, second, "--sparsity", "0.3", "--deploy-target", "vllm")) == 0
    for out in (first, second):
        report = json.loads((out / "pruning_report.json").read_text())
        assert report["settings"]["deploy_target"] == "vllm"
        assert {w["num_heads"] for w in report["widths_after"]} <= {0, 6}
    assert any(w["num_heads"] == 0 for w in report["widths_after"])  # a layer without attention was made
    capsys.readouterr()
    assert main(["export", "--model", str(second), "--format", "vllm", "--output", str(served)]) == 0
    assert "no query-head padding needed" in capsys.readouterr().out
    assert main(_prune_args(tiny_model_dir, tmp_path / "c", "--sparsity", "0.3", "--deploy-target", "vllm",
                            "--attention", "kv")) == 2
    assert "--attention kv" in capsys.readouterr().err


def test_calib_indices_fix_the_calibration_windows(tmp_path, tiny_model_dir, capsys):
    idx = tmp_path / "idx.json"
    outs = {}
    for name, indices in (("a", [0, 3, 5, 7]), ("b", [0, 3, 5, 7]), ("c", [1, 2, 4, 9])):
        idx.write_text(json.dumps(indices))
        outs[name] = tmp_path / name
        assert main(["prune", "--model", str(tiny_model_dir), "--output", str(outs[name]), "--steps", "1",
                     "--calib-seq-len", "16", "--eval-tokens", "256", "--no-bench", "--sparsity", "0.3",
                     "--calib-indices", str(idx)]) == 0
    reports = {k: json.loads((v / "pruning_report.json").read_text()) for k, v in outs.items()}
    assert reports["a"]["settings"]["calib_indices"] == [0, 3, 5, 7]
    assert reports["a"]["settings"]["calib_samples"] == 4
    assert reports["a"]["ppl_after"] == reports["b"]["ppl_after"]
    assert reports["a"]["history"][0]["calib_loss"] != reports["c"]["history"][0]["calib_loss"]
    idx.write_text(json.dumps([0, 10 ** 6]))
    assert main(_prune_args(tiny_model_dir, tmp_path / "d", "--sparsity", "0.3", "--calib-indices", str(idx))) == 2
    assert "--calib-samples" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "d"), "--calib-seq-len", "16",
                 "--sparsity", "0.3", "--no-bench", "--calib-indices", str(idx)]) == 2
    assert "out of range" in capsys.readouterr().err
