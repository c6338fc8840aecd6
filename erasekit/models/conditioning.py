"""What the denoiser reads from the text: :class:`Conditioning`, and where a phrase's tokens are.

A :class:`Conditioning` holds one batch of encoded prompts (tensors only). Token positions along
its length L are found on token ids, the same way for every family: :func:`find_token_spans`
searches a prompt for a phrase (what ``FamilyAdapter.token_spans`` answers), :func:`id_run_starts`
searches an already-tokenized prompt for a run of ids (what a text-encoder hook sees).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PhraseNotInPrompt


@dataclass
class Conditioning:
    """What the denoiser consumes for one batch of prompts. Tensors only, batch first.

    ``embeds``: SD: CLIP last hidden state (B, L, D); Flux: T5 embeddings (B, L, D).
    ``pooled``: Flux: pooled CLIP embedding (B, Dp); SD: None.
    Positions along L are the token positions of the family's main tokenizer
    (see :meth:`FamilyAdapter.token_spans`).
    """

    embeds: Tensor
    pooled: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """B, the number of prompts."""
        return self.embeds.shape[0]

    def with_tokens(self, positions: Sequence[int] | Tensor, values: Tensor) -> Conditioning:
        """Return a NEW Conditioning with ``embeds[:, positions] = values``; self is untouched.

        ``values``: (K, D) (shared by the batch) or (B, K, D), K = len(positions). The result is
        differentiable w.r.t. ``values`` (built with an out-of-place ``index_copy``).
        """
        idx = torch.as_tensor(positions, dtype=torch.long, device=self.embeds.device).reshape(-1)
        b, length, d = self.embeds.shape
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= length):
            raise IndexError(f"token positions {idx.tolist()} out of range for {length} tokens")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"token positions must be distinct, got {idx.tolist()}")
        if values.dim() == 2:
            values = values.unsqueeze(0).expand(b, -1, -1)
        if values.shape != (b, idx.numel(), d):
            raise ValueError(
                f"values must be ({idx.numel()}, {d}) or ({b}, {idx.numel()}, {d}), got {tuple(values.shape)}"
            )
        embeds = self.embeds.index_copy(1, idx, values.to(self.embeds.dtype))
        return Conditioning(embeds, self.pooled)

    def repeat(self, n: int) -> Conditioning:
        """Tile the batch n times: (B, ...) -> (n*B, ...), like ``Tensor.repeat``."""
        pooled = None if self.pooled is None else self.pooled.repeat(n, 1)
        return Conditioning(self.embeds.repeat(n, 1, 1), pooled)

    def expand_to(self, batch: int) -> Conditioning:
        """Broadcast a batch-1 conditioning to ``batch`` samples (no-op if already that size)."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a batch of {self.batch_size} to {batch}")
        return self.repeat(batch)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension."""
        pooled = [c.pooled for c in items]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("cannot concatenate conditionings with and without pooled embeddings")
        return Conditioning(
            torch.cat([c.embeds for c in items]),
            None if pooled[0] is None else torch.cat(pooled),
        )

    def to(self, device=None, dtype=None) -> Conditioning:
        """Move / cast both tensors."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return Conditioning(self.embeds.to(device=device, dtype=dtype), pooled)

    def detach(self) -> Conditioning:
        """Both tensors detached from the autograd graph."""
        pooled = None if self.pooled is None else self.pooled.detach()
        return Conditioning(self.embeds.detach(), pooled)


def find_token_spans(tokenizer, prompt: str, phrase: str, max_length: int) -> list[list[int]]:
    """Every contiguous run of ``phrase``'s token ids inside ``prompt``'s ids.

    The prompt is tokenized exactly as the pipeline encodes it (special tokens, padding to
    ``max_length``, truncation), so positions index the encoder output. The phrase is
    tokenized without special tokens; all its sub-word pieces form one run. Special tokens
    (BOS/EOS/pad) never match. A run must start and end on word boundaries of the prompt
    text, so "a" does not match the last piece of "zebra". If the ids never occur (a
    tokenizer that splits the phrase differently in context, e.g. "(car)" with
    sentencepiece), a case-insensitive whole-word search in the text is mapped to tokens
    through the offset mapping. Phrase absent or truncated away -> ValueError.
    """
    phrase_str = phrase.strip()
    if not phrase_str:
        raise ValueError(f"empty phrase for prompt {prompt!r}")
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(
        prompt,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_offsets_mapping=fast,
    )
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]] if fast else None
    special = set(tokenizer.all_special_ids)
    target = phrase_ids(tokenizer, phrase_str)

    def on_word_boundary(start: int, stop: int) -> bool:
        if offsets is None:
            return True
        a, b = offsets[start][0], offsets[stop - 1][1]
        while a < b and prompt[a].isspace():  # SentencePiece's marked piece spans the space before it
            a += 1
        left_ok = a == 0 or not prompt[a - 1].isalnum()
        right_ok = b >= len(prompt) or not prompt[b].isalnum()
        return left_ok and right_ok

    # Left to right, no two spans overlapping: an occurrence inside a taken span is skipped.
    spans: list[list[int]] = []
    k = len(target)
    free = 0
    for i in id_run_starts(ids, target, special):
        if i >= free and on_word_boundary(i, i + k):
            spans.append(list(range(i, i + k)))
            free = i + k
    if not spans and offsets is not None:
        spans = _spans_from_text(prompt, phrase_str, ids, offsets, special)
    if not spans:
        raise PhraseNotInPrompt(
            f"{phrase_str!r} does not occur in the prompt {prompt!r} as a word of its own (or comes after the "
            f"first {max_length} tokens, which is all the text encoder reads)"
        )
    return spans


def phrase_pieces(tokenizer, phrase: str) -> list[str]:
    """How ``tokenizer`` splits ``phrase`` (without special tokens), as text pieces: one piece
    for a word the vocabulary holds, many for a word it spells out; unknown characters show as
    the tokenizer's unknown token."""
    return [str(t) for t in tokenizer.convert_ids_to_tokens(phrase_ids(tokenizer, phrase))]


def phrase_ids(tokenizer, phrase: str) -> list[int]:
    """``phrase``'s token ids without special tokens (the run :func:`find_token_spans` looks for)."""
    return list(tokenizer(phrase, add_special_tokens=False)["input_ids"])


def id_run_starts(ids: Sequence[int], run: Sequence[int], special: Collection[int] = ()) -> list[int]:
    """Start positions, ascending, of every occurrence of ``run`` in ``ids`` (overlapping ones
    included). None for an empty run or one that holds an id of ``special`` (BOS/EOS/pad)."""
    run = list(run)
    k = len(run)
    if not k or any(i in special for i in run):
        return []
    ids = list(ids)
    return [i for i in range(len(ids) - k + 1) if ids[i : i + k] == run]


def run_is_whole_words(tokenizer, ids: Sequence[int], start: int, stop: int, special: Collection[int] = ()) -> bool:
    """Whether ``ids[start:stop]`` are whole words of the text ``ids`` stand for, as
    :func:`find_token_spans` requires of a match, when only ids are known (a text-encoder hook):
    decoded together with the token just before (after) it, the run's text has no letter or
    digit right before (after) it. "gun" is not a word of "handgun" (CLIP: "hand" + "gun</w>"),
    nor "car" of "cars" (T5: "\u2581car" + "s"). Special tokens (BOS/EOS/pad) and the ends of
    ``ids`` are boundaries."""
    ids = list(ids)
    decode = lambda part: tokenizer.decode(part, clean_up_tokenization_spaces=False)
    text = decode(ids[start:stop])
    if not text:
        return True
    if start > 0 and ids[start - 1] not in special:
        wider = decode(ids[start - 1 : stop])
        if len(wider) > len(text) and wider.endswith(text) and wider[-len(text) - 1].isalnum():
            return False
    if stop < len(ids) and ids[stop] not in special:
        wider = decode(ids[start : stop + 1])
        if len(wider) > len(text) and wider.startswith(text) and wider[len(text)].isalnum():
            return False
    return True


def _spans_from_text(prompt, phrase, ids, offsets, special) -> list[list[int]]:
    """The fallback of :func:`find_token_spans`: each case-insensitive whole-word match of
    ``phrase`` in the prompt text, as the non-special token positions its characters overlap
    (through the tokenizer's offset mapping); matches cut by truncation are dropped."""
    pattern = r"(?<![0-9A-Za-z])" + r"\s+".join(map(re.escape, phrase.split())) + r"(?![0-9A-Za-z])"
    spans = []
    for m in re.finditer(pattern, prompt, flags=re.IGNORECASE):
        pos = [
            j for j, (a, b) in enumerate(offsets) if ids[j] not in special and b > a and a < m.end() and b > m.start()
        ]
        # All of the phrase must survive truncation.
        if pos and offsets[pos[-1]][1] >= m.end() and offsets[pos[0]][0] <= m.start():
            spans.append(pos)
    return spans
