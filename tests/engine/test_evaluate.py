"""Perplexity over non-overlapping windows."""

import math

import pytest
import torch

from adapt_engine.errors import UsageError
from adapt_engine.evaluate import perplexity


class _Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.p
        return type("Out", (), {"logits": logits})()


def test_uniform_model_has_vocab_perplexity_and_token_count():
    res = perplexity(_Uniform(50), torch.randint(0, 50, (103,)), seq_len=10, batch_size=3)
    assert math.isclose(res["ppl"], 50, rel_tol=1e-5)
    assert res["tokens"] == 10 * 9 + 2  # ten full windows and a 3-token tail


def test_bad_sizes_are_usage_errors():
    ids = torch.randint(0, 50, (40,))
    for kwargs, flag in ((dict(batch_size=0), "--batch-size"), (dict(max_tokens=-5), "--max-tokens"),
                         (dict(seq_len=1), "--seq-len")):
        with pytest.raises(UsageError, match=flag):
            perplexity(_Uniform(50), ids, **kwargs)
