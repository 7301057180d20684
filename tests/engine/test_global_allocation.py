"""--allocation global: one ranking of heads, MLP channels and stem channels by saliency per parameter."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine.adapters import DecoderAdapter, LayerShape, count_params
from adapt_engine.errors import UsageError
from adapt_engine.global_allocation import SizeModel, plan_global
from adapt_engine.groups import GroupScores, LayerKeep
from adapt_engine.pruner import AdaptPruner, PruneSettings
from adapt_engine.surgery import apply_plan, prune_stem

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=8, length=12):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2", "qwen3", "olmo", "gemma2"])
def test_size_model_is_exact_at_other_shapes(family):
    model = make_tiny_model(family)
    adapter = DecoderAdapter(model)
    size = SizeModel(adapter)
    assert size.total(48, adapter.shapes()) == count_params(model)
    apply_plan(adapter, [LayerKeep(q_heads=torch.tensor([1, 4]), mlp=torch.arange(0, 80, 3 + j))
                         for j in range(len(adapter.layers))])
    prune_stem(adapter, torch.arange(0, 48, 2)[:24])
    assert size.total(24, adapter.shapes()) == count_params(model)


def _settings(**kw) -> PruneSettings:
    base = dict(allocation="global", compensate="none", calib_batch_size=8, steps=2)
    return PruneSettings(**{**base, **kw})


@pytest.mark.parametrize("groups", ["heads,mlp,stem", "mlp,stem", "stem", "heads,mlp"])
def test_lands_on_target_within_one_stem_channel(groups):
    model = make_tiny_model("mistral")
    pruner = AdaptPruner(model, _settings(groups=groups), _calib())
    per_stem = SizeModel(DecoderAdapter(model)).total(1, DecoderAdapter(model).shapes()) - \
        SizeModel(DecoderAdapter(model)).total(0, DecoderAdapter(model).shapes())
    target = int(count_params(model) * 0.7)
    records = pruner.prune_to(target)
    after = count_params(model)
    assert target <= after <= target + per_stem
    shapes = DecoderAdapter(model).shapes()
    if "stem" not in groups:
        assert model.config.hidden_size == 48
    if "heads" not in groups:
        assert all(s.num_heads == 6 for s in shapes)
    if "mlp" not in groups:
        assert all(s.intermediate_size == 80 for s in shapes)
    assert records[-1]["hidden_size"] == model.config.hidden_size
    assert sum(sum(r["removed_params"].values()) for r in records) == records[0]["params"] + \
        records[0]["params_removed"] - after


def test_cheapest_per_parameter_goes_first():
    model = make_tiny_model("mistral")
    adapter = DecoderAdapter(model)
    scores = GroupScores.zeros(adapter, stem=True)
    for t in (*scores.q_heads, *scores.kv_heads, *scores.mlp):
        t.fill_(1.0)
    scores.stem.fill_(1e-6)  # stem channels are nearly free: they go before any head or channel
    target = count_params(model) - 5 * (SizeModel(adapter).total(1, adapter.shapes()) -
                                        SizeModel(adapter).total(0, adapter.shapes()))
    plan = plan_global(adapter, scores, target, ("heads", "mlp", "stem"), "query", uniform=False)
    assert plan.removal_order == [["stem", 5]] and plan.hidden_size == 43
    assert all(k.removes_nothing() for k in plan.layers)
    # Per parameter: a query unit (2 heads) costs 2 for 2·2·8·48 params, an MLP channel 1 for 3·48; the
    # bigger head unit is cheaper per parameter and goes first.
    scores.stem.fill_(1e3)
    plan = plan_global(adapter, scores, count_params(model) - 3000, ("heads", "mlp", "stem"), "query", False)
    assert plan.removal_order[0][0] == "heads"


def test_max_groups_stops_a_slice_short_of_the_target():
    """accel --prune-every: one slice takes the max_groups cheapest candidates of the same ranking, in order."""
    model = make_tiny_model("mistral")
    adapter = DecoderAdapter(model)
    scores = GroupScores.zeros(adapter, stem=True)
    gen = torch.Generator().manual_seed(0)
    for t in scores.all_tensors():
        t.copy_(torch.rand(t.shape, generator=gen))
    target = count_params(model) // 2
    whole = plan_global(adapter, scores, target, ("heads", "mlp", "stem"), "query", False)
    part = plan_global(adapter, scores, target, ("heads", "mlp", "stem"), "query", False, max_groups=7)
    assert sum(n for _, n in part.removal_order) == 7 and part.params > whole.params >= target

    def first(order, n):  # the first n removals of a removal order, as a flat list of types
        return [kind for kind, count in order for _ in range(count)][:n]

    assert first(part.removal_order, 7) == first(whole.removal_order, 7)
    many = plan_global(adapter, scores, target, ("heads", "mlp", "stem"), "query", False, max_groups=10**6)
    assert many.params == whole.params and many.removal_order == whole.removal_order


def test_uniform_shape_keeps_every_layer_alike():
    model = make_tiny_model("qwen2")
    pruner = AdaptPruner(model, _settings(groups="heads,mlp,stem", uniform_shape=True, steps=3), _calib())
    pruner.prune_to(int(count_params(model) * 0.6))
    shapes = DecoderAdapter(model).shapes()
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0] != LayerShape(6, 2, 80) or model.config.hidden_size < 48


def test_global_refuses_what_it_cannot_do():
    with pytest.raises(UsageError, match="--allocation global"):
        PruneSettings(groups="heads,mlp,stem").validate()
    with pytest.raises(UsageError, match="--allocation global"):
        PruneSettings(uniform_shape=True).validate()
    with pytest.raises(UsageError, match="--groups must list"):
        PruneSettings(allocation="global", groups="heads,stems").validate()
    with pytest.raises(UsageError, match="round-to"):
        PruneSettings(allocation="global", round_to=8).validate()
    with pytest.raises(UsageError, match="vllm"):
        PruneSettings(allocation="global", deploy_target="vllm").validate()
    model = make_tiny_model("llama")
    adapter = DecoderAdapter(model)
    apply_plan(adapter, [LayerKeep(mlp=torch.arange(40 + j)) for j in range(len(adapter.layers))])
    with pytest.raises(UsageError, match="already differ"):
        AdaptPruner(model, _settings(uniform_shape=True), _calib())


def test_below_the_floor_is_refused():
    model = make_tiny_model("llama")
    pruner = AdaptPruner(model, _settings(groups="mlp"), _calib())
    with pytest.raises(UsageError, match="smallest reachable"):
        pruner.prune_to(pruner.min_params() - 1)
