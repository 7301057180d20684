"""Layer-importance normalisation: max (the paper's), robust (median/MAD, clipped), rank."""

import pytest
import torch

from adapt_engine.importance import normalize_importance
from adapt_engine.importance_scale import scale_importance

# SmolLM2-like: one outlier layer far above a spread of ordinary ones.
RAW = torch.tensor([0.008, 0.83, 0.86, 0.90, 0.92, 0.95, 0.98, 0.88, 0.91, 0.84]).neg() + 1.0


def test_max_is_the_paper_rule():
    torch.testing.assert_close(scale_importance(RAW, "max"), normalize_importance(RAW.double()).float())


def test_robust_rule_is_median_mad_clipped_then_centred():
    r = RAW.double()
    c = r - r.median()
    z = (c / (3 * 1.4826 * c.abs().median())).clamp(-1, 1)
    torch.testing.assert_close(scale_importance(RAW, "robust"), (z - z.mean()).float())


def test_robust_and_rank_spread_the_ordinary_layers_more_than_max():
    ordinary = slice(1, None)
    spread = {m: float(scale_importance(RAW, m)[ordinary].std()) for m in ("max", "robust", "rank")}
    assert spread["robust"] > 2 * spread["max"] and spread["rank"] > 2 * spread["max"]
    for m in ("robust", "rank"):
        out = scale_importance(RAW, m)
        assert int(out.argmax()) == 0  # the outlier stays the most important layer
        assert out.abs().max() <= 1 + 1e-6 and abs(float(out.mean())) < 1e-6


def test_rank_is_evenly_spaced_with_ties_averaged():
    out = scale_importance(torch.tensor([3.0, 1.0, 2.0, 2.0]), "rank")
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 0.0, 0.0]))


@pytest.mark.parametrize("method", ["max", "robust", "rank"])
def test_equal_layers_give_zero_importance(method):
    assert torch.equal(scale_importance(torch.full((5,), 0.7), method), torch.zeros(5))


def test_unknown_scale_is_a_clear_error():
    with pytest.raises(ValueError, match="--importance-scale must be one of"):
        scale_importance(RAW, "zscore")
