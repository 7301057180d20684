"""Surgery is exact: a pruned model equals the dense model with the same groups zero-masked."""

import copy

import pytest
import torch
from tiny_models import FAMILY_CASES, make_tiny_model

from adapt_engine.adapters import DecoderAdapter
from adapt_engine.groups import LayerKeep
from adapt_engine.surgery import apply_plan, zero_mask_layer


def _random_plan(adapter: DecoderAdapter, gen: torch.Generator, mode: str) -> list[LayerKeep]:
    plan = []
    for j in range(len(adapter.layers)):
        s = adapter.layer_shape(j)
        n_rep = s.num_heads // s.num_kv_heads
        keep = LayerKeep()
        if mode == "query":
            k = int(torch.randint(1, n_rep + 1, (1,), generator=gen))
            per = [torch.randperm(n_rep, generator=gen)[:k].sort().values + g * n_rep for g in range(s.num_kv_heads)]
            keep.q_heads = torch.cat(per)
        else:
            k = int(torch.randint(1, s.num_kv_heads + 1, (1,), generator=gen))
            keep.kv_heads = torch.randperm(s.num_kv_heads, generator=gen)[:k].sort().values
            keep.q_heads = (keep.kv_heads[:, None] * n_rep + torch.arange(n_rep)).flatten()
        m = int(torch.randint(1, s.intermediate_size + 1, (1,), generator=gen))
        keep.mlp = torch.randperm(s.intermediate_size, generator=gen)[:m].sort().values
        plan.append(keep)
    return plan


@pytest.mark.parametrize("family,gqa", FAMILY_CASES)
@pytest.mark.parametrize("mode", ["query", "kv"])
def test_pruned_logits_equal_zero_masked_dense(family, gqa, mode):
    dense = make_tiny_model(family, gqa)
    gen = torch.Generator().manual_seed(1)
    pruned = copy.deepcopy(dense)
    adapter = DecoderAdapter(pruned)
    plan = _random_plan(adapter, gen, mode)
    masked = copy.deepcopy(dense)
    for j, keep in enumerate(plan):
        zero_mask_layer(DecoderAdapter(masked), j, keep)
    apply_plan(adapter, plan)
    x = torch.randint(0, 320, (2, 11), generator=gen)
    with torch.no_grad():
        a, b = pruned(x).logits, masked(x).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the pruning really removed something
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    with torch.no_grad():
        assert (dense(x).logits - a).abs().max() > 1e-3


def test_generate_with_kv_cache_after_pruning():
    model = make_tiny_model("llama", True)
    adapter = DecoderAdapter(model)
    plan = [LayerKeep(q_heads=torch.tensor([0, 3]), mlp=torch.arange(0, 80, 3)) for _ in adapter.layers]
    apply_plan(adapter, plan)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_optimizer_state_and_grad_follow_the_weights():
    model = make_tiny_model("qwen2", True)
    adapter = DecoderAdapter(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 320, (2, 9))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    gate = adapter.layers[0].mlp.gate_proj.weight
    keep = torch.tensor([1, 4, 5, 30, 79])
    expected_avg = opt.state[gate]["exp_avg"][keep].clone()
    expected_sq = opt.state[gate]["exp_avg_sq"][keep].clone()
    expected_grad = gate.grad[keep].clone()
    step = opt.state[gate]["step"].clone()
    apply_plan(adapter, [LayerKeep(mlp=keep)] + [LayerKeep() for _ in adapter.layers[1:]], optimizer=opt)
    assert adapter.layers[0].mlp.gate_proj.weight is gate  # same Parameter object
    torch.testing.assert_close(opt.state[gate]["exp_avg"], expected_avg)
    torch.testing.assert_close(opt.state[gate]["exp_avg_sq"], expected_sq)
    torch.testing.assert_close(gate.grad, expected_grad)
    assert opt.state[gate]["step"] == step
    # the optimizer keeps stepping on the smaller model
    opt.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert opt.state[gate]["exp_avg"].shape == gate.shape
