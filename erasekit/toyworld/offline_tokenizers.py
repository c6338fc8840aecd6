"""Tokenizers built in code from a word list, so tiny and toy pipelines need no download.

Both behave like the real ones of their family: a word the vocabulary knows is one token, an
unknown word splits into sub-word pieces (characters at worst), and they save and load through
the stock ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from transformers import CLIPTokenizer, T5Tokenizer

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_ALPHABET = string.ascii_lowercase + string.digits + ".,;:!?'-"


def _clean_words(words: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for w in words:
        for part in w.lower().replace(",", " , ").replace(".", " . ").split():
            out.add(part)
    return sorted(out)


def _learn_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that make every word in ``words`` a single symbol.

    Standard BPE on the word list (each word counted once, "</w>" on its last character),
    with ties broken lexicographically so that the result is the same in every process.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


def clip_word_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of ``words`` is a single token.

    The merges are learned by byte-pair encoding over the word list, so unknown words fall
    back to sub-word pieces exactly as with the released CLIP vocabulary. Deterministic: the
    same words give the same token ids in every process.
    """
    vocab_words = _clean_words(words)
    merges = _learn_bpe(vocab_words)
    vocab: dict[str, int] = {CLIP_BOS: 0, CLIP_EOS: 1}
    for ch in _ALPHABET:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
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
