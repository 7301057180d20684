"""accel with --allocation global --groups ...,stem: the hidden size shrinks between phases, AdamW follows, and a
resumed run (its checkpoint holds a model of another hidden size) equals the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from adapt_engine.accel import AccelConfig, run
from adapt_engine.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("accel-stem") / "tiny-llama", tiny_tokenizer)


def _cfg(model_dir, out, **kw) -> AccelConfig:
    base = dict(output=str(out), model=str(model_dir), sparsity=0.4, interleaves=3, train_tokens=48 * 16,
                seq_len=16, global_batch=8, micro_batch=4, lr=2e-3, min_lr=2e-4, calib_samples=8, calib_seq_len=16,
                calib_batch_size=4, val_tokens=256, prune_steps=1, seed=0, no_bench=True, allocation="global",
                groups="heads,stem")  # the tiny Llama sheds stem blocks of 6 only when MLP channels are not offered
    base.update(kw)
    return AccelConfig.from_flat(**base)


def test_resumed_stem_run_equals_uninterrupted(model_dir, tmp_path):
    reference = run(_cfg(model_dir, tmp_path / "ref"))
    hidden = [rec["hidden_size"] for rec in reference.report["prune_history"]]
    assert hidden[-1] < 48 and reference.report["hidden_size_after"] == hidden[-1]

    def stop(rec):
        if rec["global_step"] == 4:
            raise Interrupt

    cfg = _cfg(model_dir, tmp_path / "cut")
    with pytest.raises(Interrupt):
        run(cfg, on_step=stop)
    resumed = run(_cfg(model_dir, tmp_path / "cut", resume=True))
    a, b = reference.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p["ppl"] for p in resumed.report["phases"]] == [p["ppl"] for p in reference.report["phases"]]


def test_train_saliency_refuses_stem(model_dir, tmp_path):
    with pytest.raises(UsageError, match="--saliency calib"):
        _cfg(model_dir, tmp_path / "x", saliency="train").validate()
