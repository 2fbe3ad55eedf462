"""A byte-level BPE tokenizer trained locally with ``tokenizers`` and wrapped as a ``PreTrainedTokenizerFast``."""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, *, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on ``texts``; every encoding starts with BOS (``<s>``).

    All 256 bytes are in the vocabulary, so any text encodes without ``<unk>``; `` A``..`` D`` are single tokens
    whenever they occur in the training text (the lettered multiple-choice answers rely on it).
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", truncation_side="right", model_max_length=512,
    )
    return fast
