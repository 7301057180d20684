"""`bench --engine`: the summary arithmetic, and a real llama.cpp run of a dense and a pruned tiny model."""

import json
import os

import pytest
from serving_models import make_serving_model, shrink

from adapt_engine.cli import main
from adapt_engine.engine_bench import summarize
from adapt_engine.saving import save_pruned
from adapt_engine.serving import engine_python, missing_engine_message


def test_summary_medians_and_ratios_vs_dense():
    raw = [{"ttft_s": [0.2, 0.1, 0.3], "levels": {"1": [{"wall_s": 1.1, "tokens": 10}] * 3,
                                                   "4": [{"wall_s": 2.0, "tokens": 40}] * 3}},
           {"ttft_s": [0.1, 0.1, 0.1], "levels": {"1": [{"wall_s": 0.55, "tokens": 10}] * 3,
                                                   "4": [{"wall_s": 1.0, "tokens": 40}] * 3}}]
    rows = summarize("vllm", ["dense", "p"], raw, new_tokens=10)
    assert rows["dense"]["ttft_s"] == pytest.approx(0.2)
    assert rows["dense"]["tpot_s"] == pytest.approx((1.1 - 0.2) / 9)
    assert rows["p"]["tokens_per_s"]["4"] == pytest.approx(40.0)
    assert rows["p"]["throughput_ratio"] == {"1": pytest.approx(2.0), "4": pytest.approx(2.0)}
    assert rows["p"]["ttft_speedup"] == pytest.approx(2.0)
    cpp = summarize("llama.cpp", ["dense", "p"], [{"ttft_s": [0.4], "token_s": [0.02]},
                                                  {"ttft_s": [0.2], "token_s": [0.01]}], new_tokens=8)
    assert cpp["p"]["tpot_speedup"] == pytest.approx(2.0) and cpp["p"]["tokens_per_s"]["1"] == pytest.approx(100)


def test_llama_cpp_bench_of_dense_and_pruned(tmp_path, tiny_tokenizer):
    if engine_python("llama.cpp") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(missing_engine_message("llama.cpp") + " (under CI a skip is not a pass)")
        pytest.skip(missing_engine_message("llama.cpp"))
    dense = save_pruned(make_serving_model(), tiny_tokenizer, tmp_path / "dense")
    pruned = save_pruned(shrink(make_serving_model(), [([0, 4], None, 37)] * 3), tiny_tokenizer, tmp_path / "p")
    out = tmp_path / "bench"
    assert main(["bench", "--engine", "llama.cpp", "--model", str(dense), "--compare", str(pruned),
                 "--prompt-lens", "16", "--new-tokens", "8", "--repeats", "2", "--output", str(out)]) == 0
    result = json.loads((out / "bench_engine.json").read_text())
    assert set(result["summary"]) == {"dense", "p"}
    assert all(len(r["ttft_s"]) == 2 for r in result["raw"].values())
    assert result["summary"]["dense"]["tpot_speedup"] == pytest.approx(1.0)
    assert (out / "bench_engine.png").stat().st_size > 0
