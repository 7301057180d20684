"""WSD learning-rate schedule."""

import pytest

from adapt_engine.schedule import WSDSchedule


def test_paper_shape_warmup_stable_decay():
    s = WSDSchedule(total_steps=200, max_lr=2e-5, min_lr=2e-6, warmup=0.05, decay=0.10)
    lrs = [s.lr(i) for i in range(200)]
    assert s.warmup_steps == 10 and s.decay_steps == 20
    # warmup: strictly increasing, linear, reaching max on its last step
    assert lrs[:10] == pytest.approx([2e-5 * (i + 1) / 10 for i in range(10)])
    assert all(x == 2e-5 for x in lrs[10:180])
    # decay: strictly decreasing, linear, reaching min exactly on the last step
    assert all(a > b for a, b in zip(lrs[179:], lrs[180:]))
    assert lrs[-1] == pytest.approx(2e-6)
    assert lrs[180] == pytest.approx(2e-5 - (2e-5 - 2e-6) / 20)


@pytest.mark.parametrize("total", [1, 2, 3, 7, 19])
def test_tiny_schedules_stay_in_range(total):
    s = WSDSchedule(total_steps=total, max_lr=1e-3, min_lr=1e-4)
    lrs = [s.lr(i) for i in range(total)]
    assert all(1e-4 - 1e-12 <= x <= 1e-3 + 1e-12 for x in lrs)
    assert s.warmup_steps + s.decay_steps <= total
    assert max(lrs) == pytest.approx(1e-3)


def test_no_warmup_no_decay_is_constant():
    s = WSDSchedule(total_steps=5, max_lr=1.0, min_lr=0.1, warmup=0.0, decay=0.0)
    assert [s.lr(i) for i in range(5)] == [1.0] * 5


def test_state_dict_round_trip():
    s = WSDSchedule(total_steps=33, max_lr=3e-4, min_lr=3e-5, warmup=0.1, decay=0.2)
    assert WSDSchedule.from_state_dict(s.state_dict()) == s


@pytest.mark.parametrize("kw,match", [
    (dict(total_steps=0), "at least one optimizer step"),
    (dict(total_steps=10, warmup=0.6, decay=0.5), "overlap"),
    (dict(total_steps=10, warmup=-0.1), "share of all optimizer steps"),
    (dict(total_steps=10, max_lr=1e-5, min_lr=1e-4), "min-lr"),
])
def test_bad_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        WSDSchedule(**kw)


def test_step_out_of_range():
    with pytest.raises(IndexError, match="outside"):
        WSDSchedule(total_steps=3).lr(3)
