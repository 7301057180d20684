"""AdamW that survives pruning: backends agree with torch, sliced state keeps stepping correctly, and the
saliency tap accumulates the Taylor group scores of the training gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from adapt_engine.kernels import group_saliency_reference
from adapt_engine.kernels.dispatch import triton_available
from tiny_models import make_tiny_model

from adapt_engine.adapters import DecoderAdapter
from adapt_engine.groups import GroupScores, LayerKeep, group_members, head_rows, tap_targets
from adapt_engine.optim import AdamW, build_optimizer, param_groups, resolve_backend
from adapt_engine.surgery import apply_plan

HP = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
CPU_BACKENDS = ["torch-fused", "torch-foreach"]



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(params=CPU_BACKENDS + ["triton"])
def backend(request, monkeypatch):
    """Every backend that can run here; the Triton kernel runs under its CPU interpreter."""
    if request.param == "triton":
        if not triton_available():
            pytest.skip("triton not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _batch(seed=0, n=4, length=12):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps, seed=0):
    model.train()
    for s in range(steps):
        ids = _batch(seed + s)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_backends_match_torch_adamw(backend):
    """Same gradients into both (so only the optimizer math is compared, not chaotic training drift)."""
    ref_model = make_tiny_model("llama", True)
    model = copy.deepcopy(ref_model)
    ref = torch.optim.AdamW(param_groups(ref_model, HP["weight_decay"]), foreach=False, **HP)
    opt = AdamW(param_groups(model, HP["weight_decay"]), backend=backend, **HP)
    for s in range(3):
        ids = _batch(s)
        ref_model(input_ids=ids, labels=ids).loss.backward()
        for a, b in zip(model.parameters(), ref_model.parameters()):
            a.grad = b.grad.clone()
        ref.step()
        opt.step()
        ref.zero_grad()
        opt.zero_grad()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _plan(adapter, seed=1):
    """A fixed random plan in 'query' mode: drop one query head per KV group and ~30% of MLP channels."""
    g = torch.Generator().manual_seed(seed)
    plan = []
    for shape in adapter.shapes():
        n_rep = shape.num_heads // shape.num_kv_heads
        keep_q = torch.stack([torch.randperm(n_rep, generator=g)[: n_rep - 1].sort().values + k * n_rep
                              for k in range(shape.num_kv_heads)]).flatten()
        keep_mlp = torch.randperm(shape.intermediate_size, generator=g)[: int(shape.intermediate_size * 0.7)]
        plan.append(LayerKeep(q_heads=keep_q, mlp=keep_mlp.sort().values))
    return plan


def _expected_slices(model, plan, head_dim):
    """param name -> (dim, kept indices), written from the plan independently of the surgery code."""
    out = {}
    for j, keep in enumerate(plan):
        rows = head_rows(keep.q_heads, head_dim)
        pre = f"model.layers.{j}."
        out[pre + "self_attn.q_proj.weight"] = (0, rows)
        out[pre + "self_attn.o_proj.weight"] = (1, rows)
        out[pre + "mlp.gate_proj.weight"] = (0, keep.mlp)
        out[pre + "mlp.up_proj.weight"] = (0, keep.mlp)
        out[pre + "mlp.down_proj.weight"] = (1, keep.mlp)
    return out


def test_sliced_state_keeps_stepping_like_fresh_adamw_on_the_small_model(backend):
    """Prune with the optimizer attached, keep training; equal to an AdamW on the small model that starts
    from the moments sliced by hand, with the step counters kept."""
    model = make_tiny_model("llama", True)
    opt = AdamW(param_groups(model, HP["weight_decay"]), backend=backend, **HP)
    _train(model, opt, 3)
    names = {p: n for n, p in model.named_parameters()}
    before = {names[p]: {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    adapter = DecoderAdapter(model)
    plan = _plan(adapter)
    params_before = list(model.parameters())
    apply_plan(adapter, plan, optimizer=opt)
    assert list(model.parameters()) == params_before  # same Parameter objects, no optimizer rebuild

    small = copy.deepcopy(model)
    ref = torch.optim.AdamW(param_groups(small, HP["weight_decay"]), foreach=False, **HP)
    slices = _expected_slices(model, plan, adapter.head_dim)
    for name, p in small.named_parameters():
        st = before[name]
        dim, idx = slices.get(name, (None, None))
        moments = {k: (st[k] if dim is None else st[k].index_select(dim, idx)) for k in ("exp_avg", "exp_avg_sq")}
        ref.state[p] = {"step": st["step"].detach().cpu().clone().float(), **moments}
        live = opt.state[dict(model.named_parameters())[name]]
        torch.testing.assert_close(live["exp_avg"], moments["exp_avg"], rtol=0, atol=0)
    _train(model, opt, 2, seed=10)
    _train(small, ref, 2, seed=10)
    for (name, a), b in zip(model.named_parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(float(st["step"]) == 5 for st in opt.state.values())


def test_state_dict_moves_between_backends():
    model = make_tiny_model("llama", True)
    opt = AdamW(param_groups(model, 0.0), backend="torch-fused", **HP)
    _train(model, opt, 2)
    clone = copy.deepcopy(model)
    opt2 = AdamW(param_groups(clone, 0.0), backend="torch-foreach", **HP)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict aliases same-device tensors
    _train(model, opt, 2, seed=5)
    _train(clone, opt2, 2, seed=5)
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_saliency_tap_accumulates_taylor_scores_of_training_gradients(backend):
    model = make_tiny_model("llama", True)
    adapter = DecoderAdapter(model)
    opt = build_optimizer(model, lr=1e-3, backend=backend)
    scores = GroupScores.zeros(adapter)
    members = group_members(adapter)
    opt.track_saliency({p: [(scores.bucket(m.layer, m.bucket), m.dim, m.group_size)] for p, m in members.items()})
    expected = GroupScores.zeros(adapter)
    model.train()
    for s in range(2):
        ids = _batch(s)
        model(input_ids=ids, labels=ids).loss.backward()
        for p, m in members.items():  # scores use the weights *before* this step's update
            group_saliency_reference(p.detach(), p.grad, m.dim, group_size=m.group_size, metric="taylor",
                                     out=expected.bucket(m.layer, m.bucket))
        opt.step()
        opt.zero_grad(set_to_none=True)
    for a, b in zip(scores.all_tensors(), expected.all_tensors()):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    opt.clear_saliency()
    snapshot = [t.clone() for t in scores.all_tensors()]
    _train(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(scores.all_tensors(), snapshot))


@pytest.mark.parametrize("family", ["llama", "mistral"])  # tied / untied LM head
def test_saliency_tap_scores_stem_channels_as_grad_times_weight(family):
    """Hidden channel c's train-tap score is Σ|w ⊙ g| over its embedding column (and untied LM head column), input
    column c of q/k/v/gate/up, output row c of o/down and element c of every hidden-size norm, written out by hand;
    the head and MLP scores of the same projection weights are unchanged by the second target."""
    model = make_tiny_model(family)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (family == "llama")
    adapter = DecoderAdapter(model)
    opt = build_optimizer(model, lr=1e-3)
    scores = GroupScores.zeros(adapter, stem=True)
    opt.track_saliency(tap_targets(adapter, scores))
    alone = GroupScores.zeros(adapter)
    expected = torch.zeros(adapter.hidden_size, dtype=torch.float64)
    model.train()
    for s in range(2):
        ids = _batch(s)
        model(input_ids=ids, labels=ids).loss.backward()
        ws = lambda t: (t.detach() * t.grad).abs().double()  # noqa: E731 (before this step's update)
        expected += ws(model.model.embed_tokens.weight).sum(0)
        if not tied:
            expected += ws(model.lm_head.weight).sum(0)
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                expected += ws(lin.weight).sum(0)
            for lin in (a.o_proj, m.down_proj):
                expected += ws(lin.weight).sum(1)
            expected += ws(layer.input_layernorm.weight) + ws(layer.post_attention_layernorm.weight)
        expected += ws(model.model.norm.weight)
        for p, m in group_members(adapter).items():
            group_saliency_reference(p.detach(), p.grad, m.dim, group_size=m.group_size, metric="taylor",
                                     out=alone.bucket(m.layer, m.bucket))
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert scores.stem.abs().sum() > 0
    torch.testing.assert_close(scores.stem.double(), expected, rtol=1e-5, atol=1e-7)
    for a, b in zip(scores.all_tensors()[:-1], alone.all_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_saliency_targets_must_match_current_shapes():
    model = make_tiny_model("llama", True)
    opt = build_optimizer(model, lr=1e-3)
    q = model.model.layers[0].self_attn.q_proj.weight
    with pytest.raises(ValueError, match="re-register"):
        opt.track_saliency({q: [(torch.zeros(5), 0, 8)]})


def test_backend_resolution_and_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch-fused"  # torch 2.13 has fused AdamW on CPU
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("sgd", torch.device("cpu"))
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW([], lr=1e-3)


def test_norms_and_biases_are_not_decayed():
    model = make_tiny_model("qwen2", True)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n
