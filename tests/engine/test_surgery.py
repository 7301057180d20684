"""Surgery is exact: a pruned model equals the dense model with the same groups zero-masked."""

import copy

import pytest
import torch
from tiny_models import FAMILY_CASES, make_tiny_model

from adapt_engine.adapters import DecoderAdapter, LayerShape
from adapt_engine.groups import KV_MERGES, LayerKeep, attention_keep, choose_kv_merge
from adapt_engine.remote.adapt_pruned_shapes import NoAttention
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


def _trained_one_step():
    """A tiny Qwen2, its adapter, an AdamW that has taken one step (moments and grads populated), its batch."""
    model = make_tiny_model("qwen2", True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 320, (2, 9))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    return model, DecoderAdapter(model), opt, x


def test_optimizer_state_and_grad_follow_the_weights():
    model, adapter, opt, x = _trained_one_step()
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


def _merge_plan(adapter: DecoderAdapter, how: str) -> list[LayerKeep]:
    """--deploy-target vllm shapes: layer 0 merges its KV heads into one, layer 1 loses its attention, MLP cut."""
    gen = torch.Generator().manual_seed(2)
    shapes = adapter.shapes()
    plan = []
    for j, s in enumerate(shapes):
        new = LayerShape(0, 0, s.intermediate_size) if j == 1 else LayerShape(s.num_heads, 1, s.intermediate_size)
        keep = attention_keep(torch.rand(s.num_heads, generator=gen), torch.rand(s.num_kv_heads, generator=gen), s,
                              new, "merge", how)
        keep.mlp = torch.randperm(s.intermediate_size, generator=gen)[:s.intermediate_size // 2].sort().values
        plan.append(keep)
    return plan


@pytest.mark.parametrize("family,gqa", FAMILY_CASES)
def test_merged_kv_heads_and_removed_attention_equal_their_masked_reference(family, gqa):
    dense = make_tiny_model(family, gqa)
    pruned = copy.deepcopy(dense)
    adapter = DecoderAdapter(pruned)
    plan = _merge_plan(adapter, "weighted")
    masked = copy.deepcopy(dense)
    for j, keep in enumerate(plan):
        zero_mask_layer(DecoderAdapter(masked), j, keep)
    apply_plan(adapter, plan)
    heads = dense.config.num_attention_heads
    assert [(s.num_heads, s.num_kv_heads) for s in adapter.shapes()] == [(heads, 1), (0, 0), (heads, 1)]
    assert isinstance(adapter.layers[1].self_attn, NoAttention)
    assert sum(p.numel() for p in adapter.layers[1].self_attn.parameters()) == 0
    x = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)
        assert (dense(x).logits - pruned(x).logits).abs().max() > 1e-3
    out = pruned.generate(x[:1], max_new_tokens=4, do_sample=False)  # the KV cache skips the layer
    assert out.shape == (1, 15)


@pytest.mark.parametrize("how", KV_MERGES)
def test_kv_merge_weights(how):
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    mix = choose_kv_merge(scores, 2, how)
    assert mix.shape == (2, 4) and torch.allclose(mix.sum(1), torch.ones(2, dtype=mix.dtype))
    assert (mix[0, 2:] == 0).all() and (mix[1, :2] == 0).all()  # adjacent runs only
    # the second run's heads both scored 0: weighted falls back to the mean, salient keeps the first
    want = {"mean": [0.5, 0.5, 0.5, 0.5], "salient": [0.0, 1.0, 1.0, 0.0], "weighted": [0.25, 0.75, 0.5, 0.5]}[how]
    assert mix[0, :2].tolist() + mix[1, 2:].tolist() == want
    with pytest.raises(ValueError, match="must divide"):
        choose_kv_merge(scores, 3, how)


def test_optimizer_state_follows_merged_and_removed_attention():
    model, adapter, opt, x = _trained_one_step()
    k = adapter.layers[0].self_attn.k_proj.weight
    q1 = adapter.layers[1].self_attn.q_proj.weight
    plan = _merge_plan(adapter, "mean")
    expected = opt.state[k]["exp_avg"].view(2, 8, -1).mean(0)
    apply_plan(adapter, plan, optimizer=opt)
    assert adapter.layers[0].self_attn.k_proj.weight is k and k.shape == (8, 48)
    torch.testing.assert_close(opt.state[k]["exp_avg"], expected)
    assert adapter.layers[1].self_attn.q_proj.weight is q1 and q1.numel() == 0
    opt.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()  # training goes on with the smaller model
    assert opt.state[k]["exp_avg"].shape == k.shape
