"""Shared fixtures: tiny random-weight models of every supported family and a tiny offline tokenizer."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread. On a shared 2-core box, OpenMP barriers across busy cores make
    microsecond ops take milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 320-token BPE tokenizer trained on the built-in text in well under a second (offline)."""
    from pydoc_data import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    texts = [topics.topics[k] for k in sorted(topics.topics)][:60]
    tok.train_from_iterator(texts, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A saved tiny Llama (GQA) with its tokenizer, as a user's local model folder."""
    return save_tiny_llama(tmp_path / "tiny-llama", tiny_tokenizer)
