"""Attention ladders: rungs, shapes, parameter counts and costs of each mode, and what each deploy target allows."""

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine.adapters import DecoderAdapter, LayerShape
from adapt_engine.args import DEPLOY_TARGETS, MERGE, ladder_for
from adapt_engine.attention_ladder import attention_params, rung_costs, rungs, shape_at
from adapt_engine.errors import UsageError
from adapt_engine.groups import attention_keep
from adapt_engine.surgery import apply_plan


def test_rungs_of_each_mode():
    smol = LayerShape(9, 3, 1536)
    assert rungs(smol, "query", 1) == [3, 2, 1]
    assert rungs(smol, "kv", 1) == [3, 2, 1]
    assert rungs(smol, MERGE, 1) == [3, 1, 0]
    assert rungs(smol, MERGE, 0) == [3, 1]  # layer 0 always keeps its attention (vLLM crashes without)
    assert rungs(LayerShape(32, 8, 10), MERGE, 5) == [8, 4, 2, 1, 0]
    assert rungs(LayerShape(36, 6, 10), MERGE, 5) == [6, 3, 2, 1, 0]
    assert rungs(LayerShape(36, 3, 10), MERGE, 5) == [3, 1, 0]  # from 3 KV heads only divisors of 3 are reachable
    assert rungs(LayerShape(0, 0, 10), MERGE, 5) == [0]
    for r in rungs(LayerShape(32, 8, 10), MERGE, 5):
        s = shape_at(LayerShape(32, 8, 10), r, MERGE, 7)
        assert s.num_heads in (0, 32) and (s.num_heads == 0 or s.num_heads % s.num_kv_heads == 0)


@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2"])
def test_attention_params_match_the_pruned_model(family):
    model = make_tiny_model(family, True)
    adapter = DecoderAdapter(model)
    original = adapter.shapes()
    targets = [LayerShape(6, 1, 80), LayerShape(0, 0, 80), LayerShape(6, 2, 80)]
    plan = [attention_keep(torch.rand(6), torch.rand(2), s, t, MERGE) for s, t in zip(original, targets)]
    predicted = [attention_params(adapter, j, original[j], t.num_kv_heads, MERGE) for j, t in enumerate(targets)]
    apply_plan(adapter, plan)
    assert [adapter.attention_params(j) for j in range(3)] == predicted
    assert predicted[1] == 0


def test_rung_costs():
    q = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    kv = torch.tensor([10.0, 20.0])
    shape = LayerShape(6, 2, 8)
    assert rung_costs(q, kv, shape, MERGE, [2, 1, 0]) == {2: 0.0, 1: 10.0, 0: 51.0}
    # query: r-th cheapest query head of every group; kv: cheapest whole groups
    assert rung_costs(q, kv, shape, "query", [3, 2, 1]) == {3: 0.0, 2: 5.0, 1: 12.0}
    assert rung_costs(q, kv, shape, "kv", [2, 1]) == {2: 0.0, 1: 16.0}


def test_deploy_targets_allow_what_they_serve():
    assert DEPLOY_TARGETS == ("hf", "vllm", "llama.cpp")
    for target in ("hf", "llama.cpp"):  # llama.cpp's deci takes per-layer query and KV heads as they are
        assert ladder_for(target, "query") == "query" and ladder_for(target, "kv") == "kv"
    assert ladder_for("vllm", "query") == MERGE
    with pytest.raises(UsageError, match="--attention kv .* vllm"):
        ladder_for("vllm", "kv")
    with pytest.raises(UsageError, match="--deploy-target must be one of"):
        ladder_for("tgi", "query")
