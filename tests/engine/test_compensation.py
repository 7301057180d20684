"""Weight compensation: exact when nothing is removed, never worse than plain removal, surgery stays exact."""

import copy

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from adapt_engine.adapters import DecoderAdapter, count_params
from adapt_engine.compensation import InputStatistics, check_compensation, compensate_plan, refit_columns
from adapt_engine.errors import UsageError
from adapt_engine.groups import LayerKeep
from adapt_engine.importance import calibration_pass
from adapt_engine.pruner import AdaptPruner, PruneSettings
from adapt_engine.saving import load_pruned, save_pruned
from adapt_engine.surgery import apply_plan, zero_mask_layer


def _calib(n=8, length=12, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _correlated_inputs(tokens=400, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, n // 2, generator=gen) @ torch.randn(n // 2, n, generator=gen) + 0.1 * torch.randn(
        tokens, n, generator=gen)


@pytest.mark.parametrize("damp", [0.0, 0.01, 1.0])
def test_refit_with_nothing_removed_returns_the_same_weights(damp):
    x = _correlated_inputs()
    w = torch.randn(7, 24)
    out = refit_columns(w, x.T @ x, torch.arange(24), damp)
    assert torch.equal(out, w)


@pytest.mark.parametrize("damp", [0.0, 0.001, 0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("seed", range(4))
def test_refit_output_error_never_above_plain_removal(damp, seed):
    x = _correlated_inputs(seed=seed)
    gen = torch.Generator().manual_seed(seed + 10)
    w = torch.randn(7, 24, generator=gen)
    keep = torch.randperm(24, generator=gen)[: 10 + seed].sort().values
    ref = x @ w.T
    plain = (ref - x[:, keep] @ w[:, keep].T).square().sum()
    refit = (ref - x[:, keep] @ refit_columns(w, x.T @ x, keep, damp).T).square().sum()
    assert refit <= plain * (1 + 1e-6)
    if damp <= 0.01:
        assert refit < 0.5 * plain  # correlated inputs: the kept columns recover most of the loss


def test_refit_with_zero_damp_is_the_least_squares_solution():
    x = _correlated_inputs(tokens=300)
    w = torch.randn(5, 24)
    keep = torch.arange(0, 24, 2)
    sol = torch.linalg.lstsq(x[:, keep].double(), (x @ w.T).double()).solution.T
    torch.testing.assert_close(refit_columns(w, x.T @ x, keep, 0.0).double(), sol, rtol=1e-3, atol=1e-3)


def _stats(model, method, calib):
    adapter = DecoderAdapter(model)
    stats = InputStatistics(adapter, method)
    calibration_pass(adapter, calib, 4, None, None, observers=(stats,))
    return stats


def _plan(adapter, gen):
    plan = []
    for j in range(len(adapter.layers)):
        s = adapter.layer_shape(j)
        n_rep = s.num_heads // s.num_kv_heads
        q = torch.cat([torch.randperm(n_rep, generator=gen)[:2].sort().values + g * n_rep
                       for g in range(s.num_kv_heads)])
        mlp = torch.randperm(s.intermediate_size, generator=gen)[: s.intermediate_size // 2].sort().values
        plan.append(LayerKeep(q_heads=q, mlp=mlp))
    return plan


@pytest.mark.parametrize("family,method,select", [
    ("llama", "lstsq", "saliency"), ("qwen2", "lstsq", "saliency"), ("llama-bias", "bias", "saliency"),
    ("llama-bias", "lstsq", "saliency"), ("llama", "lstsq", "obs"), ("qwen2", "lstsq", "obs")])
def test_pruned_logits_equal_masked_and_compensated_reference(family, method, select):
    dense = make_tiny_model(family)
    calib = _calib()
    stats = _stats(dense, method, calib)
    plan = _plan(DecoderAdapter(dense), torch.Generator().manual_seed(3))
    chosen = [None if k.mlp is None else k.mlp.clone() for k in plan]
    pruned, reference = copy.deepcopy(dense), copy.deepcopy(dense)
    compensate_plan(DecoderAdapter(pruned), plan, stats, 0.01, select)  # obs re-chooses plan's MLP channels
    if select == "obs":
        assert any(c is not None and not torch.equal(c, k.mlp) for c, k in zip(chosen, plan))
        assert all(c is None or c.numel() == k.mlp.numel() for c, k in zip(chosen, plan))
    apply_plan(DecoderAdapter(pruned), plan)
    ref_adapter = DecoderAdapter(reference)
    compensate_plan(ref_adapter, plan, stats, 0.01)
    for j, keep in enumerate(plan):
        zero_mask_layer(ref_adapter, j, keep)
    x = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)
        # compensation really changed something relative to plain masking
        plain = copy.deepcopy(dense)
        for j, keep in enumerate(plan):
            zero_mask_layer(DecoderAdapter(plain), j, keep)
        assert (plain(x).logits - pruned(x).logits).abs().max() > 1e-4


def _layer_io(model, calib):
    """Inputs of every down_proj and o_proj on the calibration set."""
    adapter = DecoderAdapter(model)
    seen = {}
    handles = []
    for j, layer in enumerate(adapter.layers):
        for name, lin in (("down", adapter.mlp_projections(layer)[2]), ("o", adapter.attention_projections(layer)[3])):
            handles.append(lin.register_forward_pre_hook(
                lambda m, a, key=(name, j): seen.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=calib)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_compensated_layers_reproduce_calibration_outputs_better_than_removal():
    dense = make_tiny_model("llama")
    calib = _calib()
    stats = _stats(dense, "lstsq", calib)
    io = _layer_io(dense, calib)
    adapter = DecoderAdapter(dense)
    plan = _plan(adapter, torch.Generator().manual_seed(5))
    comp = copy.deepcopy(dense)
    compensate_plan(DecoderAdapter(comp), plan, stats, 0.01)
    comp_adapter = DecoderAdapter(comp)
    for j, keep in enumerate(plan):
        down = adapter.mlp_projections(adapter.layers[j])[2]
        down_c = comp_adapter.mlp_projections(comp_adapter.layers[j])[2]
        x = io[("down", j)]
        ref = x @ down.weight.T
        plain = (ref - x[:, keep.mlp] @ down.weight[:, keep.mlp].T).square().sum()
        refit = (ref - x[:, keep.mlp] @ down_c.weight[:, keep.mlp].T).square().sum()
        assert refit <= plain * (1 + 1e-5)


def test_bias_compensation_keeps_the_mean_output():
    dense = make_tiny_model("llama-bias")
    calib = _calib()
    stats = _stats(dense, "bias", calib)
    io = _layer_io(dense, calib)
    plan = _plan(DecoderAdapter(dense), torch.Generator().manual_seed(7))
    comp = copy.deepcopy(dense)
    compensate_plan(DecoderAdapter(comp), plan, stats, 0.0)
    a, c = DecoderAdapter(dense), DecoderAdapter(comp)
    for j, keep in enumerate(plan):
        down, down_c = a.mlp_projections(a.layers[j])[2], c.mlp_projections(c.layers[j])[2]
        x = io[("down", j)]
        full = (x @ down.weight.T + down.bias).mean(0)
        kept = (x[:, keep.mlp] @ down_c.weight[:, keep.mlp].T + down_c.bias).mean(0)
        torch.testing.assert_close(kept, full, rtol=1e-4, atol=1e-4)


def test_bias_is_refused_for_models_without_o_and_down_bias():
    with pytest.raises(UsageError, match="no bias on o_proj and down_proj.*--compensate lstsq"):
        check_compensation(DecoderAdapter(make_tiny_model("llama")), "bias", 0.01)
    with pytest.raises(UsageError, match="--compensate-damp"):
        check_compensation(DecoderAdapter(make_tiny_model("llama")), "lstsq", -1.0)
    with pytest.raises(UsageError):
        AdaptPruner(make_tiny_model("qwen2"), PruneSettings(compensate="bias", steps=1), _calib())


@pytest.mark.parametrize("method,select", [("lstsq", "saliency"), ("bias", "saliency"), ("lstsq", "obs")])
@pytest.mark.parametrize("mode", ["query", "kv"])
def test_compensated_prune_lands_on_target_and_reloads_both_ways(tmp_path, tiny_tokenizer, method, select, mode):
    model = make_tiny_model("llama-bias")
    settings = PruneSettings(steps=2, attention=mode, compensate=method, mlp_select=select)
    pruner = AdaptPruner(model, settings, _calib())
    target = pruner.target_from_sparsity(0.4)
    pruner.prune_to(target)
    assert abs(count_params(model) - target) <= 3 * 48 // 2 + 1
    out = save_pruned(model, tiny_tokenizer, tmp_path / "out", {"note": "test"})
    x = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(load_pruned(out)(x).logits, ref)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(x).logits, ref)



# --mlp-select obs: greedy structured OBS picks the columns whose removal (with the optimal update of the rest)
# costs least, measured here by brute force on the damped quadratic it minimises.


def _damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    h = gram.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()) + 1e-12)
    return h


def _removal_error(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> float:
    """min over V of tr((W - V E_S) H (W - V E_S)ᵀ): the best refit of the kept columns, by direct solve."""
    v = torch.linalg.solve(h[keep][:, keep], (w @ h[:, keep]).T).T
    full = torch.zeros_like(w)
    full[:, keep] = v
    d = w - full
    return float(torch.trace(d @ h @ d.T))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_keep_removes_the_column_brute_force_finds_cheapest(seed):
    from adapt_engine.compensation import OBS_DAMP, obs_keep

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 7, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    h = _damped(x.T @ x, OBS_DAMP)
    errors = [_removal_error(w, h, torch.tensor([c for c in range(7) if c != p])) for p in range(7)]
    kept = obs_keep(w, x.T @ x, 6)
    removed = sorted(set(range(7)) - set(kept.tolist()))
    assert removed == [min(range(7), key=errors.__getitem__)]
    # Two removals: greedy, so never better than the best pair, and no worse than removing the two cheapest alone.
    kept2 = obs_keep(w, x.T @ x, 5)
    assert kept2.tolist() == sorted(kept2.tolist()) and len(kept2) == 5
    naive = torch.tensor(sorted(sorted(range(7), key=errors.__getitem__)[2:]))
    assert _removal_error(w, h, kept2) <= _removal_error(w, h, naive) + 1e-9
    assert obs_keep(w, x.T @ x, 7).tolist() == list(range(7))


def test_obs_select_needs_lstsq():
    from adapt_engine.args import PruneSettings
    from adapt_engine.errors import UsageError

    with pytest.raises(UsageError, match="--mlp-select obs .* --compensate lstsq"):
        PruneSettings(mlp_select="obs", compensate="none").validate()
    PruneSettings(mlp_select="obs").validate()


# --compensate-carry: the statistics of earlier sub-steps, cut to the kept inputs, join the next refit.


@pytest.mark.parametrize("method", ["lstsq", "bias"])
@pytest.mark.parametrize("part", ["mlp", "heads"])
def test_kept_statistics_are_those_of_the_cut_model(method, part):
    """Gathered to a plan's kept inputs, the statistics equal what a calibration pass of the cut model gathers
    (the cut is in the last layer, so no earlier input moves; a head cut also moves that layer's MLP inputs)."""
    model = make_tiny_model("llama-bias")
    calib = _calib()
    stats = _stats(model, method, calib)
    adapter = DecoderAdapter(model)
    last = len(adapter.layers) - 1
    cut = _plan(adapter, torch.Generator().manual_seed(3))[last]
    plan = [LayerKeep() for _ in adapter.layers]
    plan[last] = LayerKeep(mlp=cut.mlp) if part == "mlp" else LayerKeep(q_heads=cut.q_heads)
    apply_plan(adapter, plan, None)
    stats.keep(plan)
    fresh = _stats(model, method, calib)
    for j in range(len(adapter.layers)):
        torch.testing.assert_close(stats.attn[j], fresh.attn[j], rtol=1e-5, atol=1e-4)
        if not (part == "heads" and j == last):
            torch.testing.assert_close(stats.mlp[j], fresh.mlp[j], rtol=1e-5, atol=1e-4)
    assert stats.mlp[last].shape[0] == adapter.layer_shape(last).intermediate_size


def test_a_pass_started_from_earlier_statistics_adds_to_their_weighted_sum():
    model = make_tiny_model("llama")
    adapter = DecoderAdapter(model)
    a, b = _stats(model, "lstsq", _calib(seed=0)), _stats(model, "lstsq", _calib(seed=1))
    expected = [x + 0.25 * y for x, y in zip(a.mlp, b.mlp)]
    tokens = a.tokens + 0.25 * b.tokens
    stats = InputStatistics(adapter, "lstsq")
    stats.start_from(b, 0.25)
    calibration_pass(adapter, _calib(seed=0), 4, None, None, observers=(stats,))
    for got, want in zip(stats.mlp, expected):
        torch.testing.assert_close(got, want)
    assert stats.tokens == tokens


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_carried_statistics_change_the_refit_and_keep_surgery_exact(tmp_path, tiny_tokenizer, family):
    """With resampled windows the carry is used (other weights than without it); the result reloads exactly."""
    results = {}
    for carry in (0.0, 1.0):
        model = make_tiny_model(family)
        settings = PruneSettings(steps=3, compensate="lstsq", calib_resample=True, compensate_carry=carry)
        pruner = AdaptPruner(model, settings, _calib(), calib_sampler=lambda i: _calib(seed=100 + i))
        target = pruner.target_from_sparsity(0.4)
        pruner.prune_to(target)
        assert abs(count_params(model) - target) <= 3 * 48 // 2 + 1
        results[carry] = model
    carried, fresh = results[1.0], results[0.0]
    same_shapes = all(p.shape == q.shape for p, q in zip(carried.parameters(), fresh.parameters()))
    assert not same_shapes or any(not torch.equal(p, q) for p, q in zip(carried.parameters(), fresh.parameters()))
    out = save_pruned(carried, tiny_tokenizer, tmp_path / "out", {"note": "test"})
    x = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        ref = carried(x).logits
        assert torch.equal(load_pruned(out)(x).logits, ref)


def test_carry_needs_a_refit():
    with pytest.raises(UsageError, match="--compensate-carry .* --compensate lstsq"):
        PruneSettings(compensate="none", compensate_carry=0.5).validate()
    PruneSettings(compensate_carry=0.5).validate()


@pytest.mark.parametrize("micro", [2, 8])
def test_bf16_pass_gathers_float32_grams_of_its_exact_inputs(micro):
    """Under bf16 autocast the down_proj/o_proj inputs are bf16, but the Gram matrices are float32 sums of their
    exact products (autocast's own bf16 product, rounded per micro-batch, was 0.4 % off and accumulated in bf16)."""
    model = make_tiny_model("llama")
    adapter = DecoderAdapter(model)
    seen: dict[str, list[torch.Tensor]] = {"mlp": [], "attn": []}
    _, _, _, o = adapter.attention_projections(adapter.layers[0])
    _, _, down = adapter.mlp_projections(adapter.layers[0])
    handles = [lin.register_forward_pre_hook(lambda m, a, key=key: seen[key].append(a[0].detach().clone()))
               for key, lin in (("mlp", down), ("attn", o))]
    stats = InputStatistics(adapter, "lstsq")
    try:
        calibration_pass(adapter, _calib(n=16, length=24), 8, None, "taylor", calib_dtype="bfloat16",
                         micro_batch_size=micro, observers=(stats,))
    finally:
        for h in handles:
            h.remove()
    for key, got in (("mlp", stats.mlp[0]), ("attn", stats.attn[0])):
        assert {x.dtype for x in seen[key]} == {torch.bfloat16}
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[key]]).double()
        want = xs.T @ xs
        assert got.dtype == torch.float32
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
