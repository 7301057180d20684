"""Per-layer sparsity and parameter accounting."""

import torch

from adapt_engine.allocation import apportion_mlp, layer_sparsities, step_targets


def test_layer_sparsity_formula_and_clip():
    imp = torch.tensor([1.0, 0.0, -1.0])
    s = layer_sparsities(0.5, imp, 0.02)
    torch.testing.assert_close(s, torch.tensor([0.48, 0.5, 0.52]))
    assert layer_sparsities(0.995, imp, 0.02).max() <= 0.99
    assert layer_sparsities(0.0, imp, 0.02).min() >= 0.0


def test_step_targets_are_linear_and_end_on_target():
    t = step_targets(1000, 500, 5)
    assert t == [900, 800, 700, 600, 500]


def test_apportion_hits_total_and_respects_bounds():
    widths = apportion_mlp([10.4, 20.6, 30.2], current=[100, 90, 100], original=[100, 100, 100],
                           total_keep=240, round_to=1)
    assert sum(widths) == 240
    assert all(w <= c for w, c in zip(widths, [100, 90, 100]))


def test_apportion_round_to_gives_multiples():
    widths = apportion_mlp([33.0, 40.0, 10.0], current=[128] * 3, original=[128] * 3, total_keep=300, round_to=8)
    assert all(w % 8 == 0 for w in widths)
    assert abs(sum(widths) - 300) <= 4
