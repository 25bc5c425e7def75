"""A word-level tokenizer for the toy task, built with the `tokenizers` library.

Words keep their leading space (" so") and digits are single tokens (" 3", "7"), so
that decoding is plain concatenation and "82" never decodes as "8 2".
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spd_lightning.toy.task import EOS, PAD, UNK, vocabulary

# A leading space stays glued to the word or digit after it; any other character stands alone.
_SPLIT_PATTERN = r" ?[A-Za-z]+| ?\d|\s+|[^\sA-Za-z\d]"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=128
    )


def save_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
