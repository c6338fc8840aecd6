"""Tokenizers built in code from a word list, so tiny and toy pipelines need no download.

Both behave like the real ones of their family: a word the vocabulary knows is one token, an
unknown word splits into sub-word pieces (characters at worst), and they save and load through
the stock ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, T5Tokenizer

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_ALPHABET = string.ascii_lowercase + string.digits + ".,;:!?'-"


def _clean_words(words: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for w in words:
        for part in w.lower().replace(",", " , ").replace(".", " . ").split():
            out.add(part)
    return sorted(out)


def clip_word_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of ``words`` is a single token.

    The merges are learned by a real BPE trainer over the word list, so unknown words fall
    back to sub-word pieces exactly as with the released CLIP vocabulary.
    """
    vocab_words = _clean_words(words)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        special_tokens=[CLIP_BOS, CLIP_EOS],
        initial_alphabet=list(_ALPHABET),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(vocab_words, trainer=trainer)
    vocab = bpe.get_vocab()
    # Every single character also as a word-final piece, so that any word can be spelled.
    for ch in _ALPHABET:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=CLIP_EOS,
    )


def t5_word_tokenizer(words: Iterable[str], model_max_length: int = 512) -> T5Tokenizer:
    """A T5 unigram tokenizer whose vocabulary holds every word of ``words`` as one piece.

    Single characters carry low scores, so known words are never split and unknown ones are
    spelled out. No BOS token, ``</s>`` at the end, as in the released T5 tokenizer.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -2.0) for w in _clean_words(words)]
    vocab += [("\u2581", -6.0)]
    vocab += [(ch, -8.0) for ch in _ALPHABET + string.ascii_uppercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
