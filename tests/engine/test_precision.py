"""The float32 matmul mode of calibration: restored after use, chosen by the probe, refused where it cannot run,
and (where this CPU's bf16 mode passes the probe) giving the IEEE scores to float32-class accuracy."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine import precision
from adapt_engine.adapters import DecoderAdapter
from adapt_engine.errors import UsageError
from adapt_engine.importance import calibration_pass

needs_switch = pytest.mark.skipif(precision._mkldnn_matmul() is None, reason="torch without the fp32-precision switch")


@needs_switch
def test_mode_is_restored_after_the_block_and_after_an_error():
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    with precision.fp32_matmul("bf16"):
        assert matmul.fp32_precision == "bf16"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError, match="boom"), precision.fp32_matmul("bf16"):
        raise RuntimeError("boom")
    assert matmul.fp32_precision == before


def test_auto_follows_the_probe(monkeypatch):
    for accurate, mode in ((True, "bf16"), (False, "ieee")):
        monkeypatch.setattr(precision, "bf16_mode_is_accurate", lambda a=accurate: a)
        assert precision.resolve_fp32_matmul("auto", "cpu") == mode
    assert precision.resolve_fp32_matmul("ieee", "cpu") == "ieee"


def test_probe_tolerance_separates_float32_from_plain_bf16():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 256, generator=g)
    exact = a.double() @ b.double()
    rel = lambda got: float((got.double() - exact).abs().max() / exact.abs().max())  # noqa: E731
    with precision.fp32_matmul("ieee"):
        assert rel(a @ b) < precision.PROBE_TOLERANCE / 5
    assert rel(a.bfloat16() @ b.bfloat16()) > precision.PROBE_TOLERANCE * 50


def test_bad_choices_are_refused_with_the_fix():
    with pytest.raises(UsageError, match="--fp32-matmul must be one of"):
        precision.resolve_fp32_matmul("tf32", "cpu")
    with pytest.raises(UsageError, match="CPU .*mode"):
        precision.resolve_fp32_matmul("bf16", "cuda")
    assert precision.resolve_fp32_matmul("auto", "cuda") == "ieee"


@needs_switch
@pytest.mark.skipif(not precision.bf16_mode_is_accurate(), reason="this CPU's bf16 mode fails the accuracy probe")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_accurate_bf16_mode_keeps_the_ieee_scores(family):
    model = make_tiny_model(family, True)
    adapter = DecoderAdapter(model)
    ids = torch.randint(0, 320, (8, 12), generator=torch.Generator().manual_seed(0))
    raw_i, scores_i, loss_i = calibration_pass(adapter, ids, 4, "cosine", "taylor", fp32_matmul="ieee")
    raw_b, scores_b, loss_b = calibration_pass(adapter, ids, 4, "cosine", "taylor", fp32_matmul="bf16")
    assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")
    assert abs(loss_i - loss_b) <= 1e-5 * abs(loss_i)
    torch.testing.assert_close(raw_b, raw_i, rtol=1e-4, atol=1e-7)
    for b, i in zip(scores_b.all_tensors(), scores_i.all_tensors()):
        torch.testing.assert_close(b, i, rtol=1e-3, atol=1e-4 * float(i.abs().max()))
