"""Stem (hidden-channel) surgery is exact: the pruned model equals the dense model whose dropped hidden channels
are zeroed and whose norms are computed over the kept channels alone (removal is not zeroing for a norm)."""

import copy

import pytest
import torch
from tiny_models import FAMILY_CASES, make_tiny_model

from adapt_engine.adapters import DecoderAdapter, count_params
from adapt_engine.groups import LayerKeep
from adapt_engine.saving import load_pruned, save_pruned
from adapt_engine.surgery import apply_plan, prune_stem

pytestmark = pytest.mark.usefixtures("one_thread")


def _masked_norm(norm: torch.nn.Module, keep: torch.Tensor) -> None:
    """Make ``norm`` normalise over the ``keep`` channels only and output 0 on the others (the reference)."""
    kept = copy.deepcopy(norm)
    for name, p in list(kept.named_parameters(recurse=False)):
        setattr(kept, name, torch.nn.Parameter(p.data[keep].clone()))
    if hasattr(kept, "normalized_shape"):
        kept.normalized_shape = (keep.numel(),)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[..., keep] = kept(x[..., keep])
        return out

    norm.forward = forward


def masked_reference(dense: torch.nn.Module, keep: torch.Tensor) -> torch.nn.Module:
    """The dense model with hidden channels outside ``keep`` zeroed everywhere they enter the residual stream
    (embedding columns, o/down output rows and biases) and every hidden-size norm computed over ``keep``."""
    ref = copy.deepcopy(dense)
    adapter = DecoderAdapter(ref)
    drop = torch.ones(adapter.hidden_size, dtype=torch.bool)
    drop[keep] = False
    with torch.no_grad():
        ref.get_input_embeddings().weight[:, drop] = 0
        for layer in adapter.layers:
            for lin in (adapter.attention_projections(layer)[3], adapter.mlp_projections(layer)[2]):
                lin.weight[drop] = 0
                if lin.bias is not None:
                    lin.bias[drop] = 0
    for norm in adapter.hidden_norms():
        _masked_norm(norm, keep)
    return ref


def _random_keep(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@pytest.mark.parametrize("family,gqa", FAMILY_CASES)
def test_stem_pruned_logits_equal_masked_reference(family, gqa):
    dense = make_tiny_model(family, gqa)
    keep = _random_keep(48, 36, seed=3)  # a multiple of every tiny config's heads
    ref = masked_reference(dense, keep)
    pruned = copy.deepcopy(dense)
    adapter, other = DecoderAdapter(pruned), DecoderAdapter(pruned)
    before = count_params(pruned)
    prune_stem(adapter, keep)
    assert pruned.config.hidden_size == 36 and adapter.hidden_size == 36
    assert other.hidden_size == 36  # every adapter of the model sees the new width (reports use their own)
    assert pruned.config.head_dim == 8
    # Exactly the stem members lost 12 channels each (a tied head once).
    per_channel = sum(p.numel() // p.shape[d] for p, d in DecoderAdapter(copy.deepcopy(dense)).stem_members())
    assert before - count_params(pruned) == 12 * per_channel
    x = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = pruned(x).logits, ref(x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
        assert (dense(x).logits - got).abs().max() > 1e-3  # something was really removed


@pytest.mark.parametrize("family", ["llama", "gemma", "olmo", "qwen3"])
def test_stem_and_width_pruning_save_and_reload_both_ways(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(family)
    adapter = DecoderAdapter(model)
    apply_plan(adapter, [LayerKeep(q_heads=torch.tensor([0, 2, 3, 5]), mlp=torch.arange(0, 80, 2 + j))
                         for j in range(len(adapter.layers))])
    prune_stem(adapter, _random_keep(48, 36, seed=5))  # Llama configs want a multiple of num_attention_heads
    out = save_pruned(model, None, tmp_path / "m")
    x = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        want = model(x).logits
        assert torch.equal(load_pruned(out)(x).logits, want)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        assert torch.equal(remote(x).logits, want)
    assert remote.config.hidden_size == 36 and remote.config.head_dim == 8


def test_gemma_tied_embedding_scale_is_folded_exactly():
    model = make_tiny_model("gemma")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    keep = _random_keep(48, 30, seed=6)
    ref = masked_reference(model, keep)
    prune_stem(DecoderAdapter(model), keep)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(30 ** 0.5)
    x = torch.randint(0, 320, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=2e-5)


def test_adamw_state_and_grads_follow_stem_channels():
    model = make_tiny_model("qwen2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 320, (2, 9))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    keep = _random_keep(48, 40, seed=7)
    adapter = DecoderAdapter(model)
    members = adapter.stem_members()
    expected = {id(p): (opt.state[p]["exp_avg"].index_select(d, keep).clone(),
                        opt.state[p]["exp_avg_sq"].index_select(d, keep).clone(),
                        p.grad.index_select(d, keep).clone(), p.data.index_select(d, keep).clone(), p)
                for p, d in members}
    prune_stem(adapter, keep, optimizer=opt)
    for avg, sq, grad, data, p in expected.values():
        assert torch.equal(p.data, data)
        assert torch.equal(p.grad, grad)
        assert torch.equal(opt.state[p]["exp_avg"], avg) and torch.equal(opt.state[p]["exp_avg_sq"], sq)
    opt.step()  # the same optimizer keeps working on the narrower model
    model(input_ids=x, labels=x).loss.backward()


def test_llama_hidden_size_must_stay_a_multiple_of_the_config_heads():
    with pytest.raises(ValueError, match="multiple of 6"):
        prune_stem(DecoderAdapter(make_tiny_model("llama")), torch.arange(40))


def test_keeping_every_channel_changes_nothing():
    model = make_tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prune_stem(DecoderAdapter(model), torch.arange(48))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
