"""Learned token rows: a word's input embedding replaced, in every text encoder, by a tensor.

Textual inversion (and attacks built on it) learns one new row of a text encoder's
token-embedding table. Here the row lives outside the model: inside :func:`token_rows`, every
occurrence of a placeholder word's token id in a text encoder's input ids embeds as the given
vector instead of the table's row, differentiably. The table itself, and every prompt without the
placeholder, stay exactly as they were (the override is a forward hook that leaves other
positions' outputs untouched), and leaving the context removes every hook.

A pipeline's text towers are (name, tokenizer, encoder) pairs: ``text_encoder`` (CLIP: SD's only
one, Flux's pooled one) and ``text_encoder_2`` (Flux's T5).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError

TOWERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def text_towers(pipe) -> list[tuple[str, Any, nn.Module]]:
    """(encoder component name, tokenizer, encoder) of every text encoder the pipeline has."""
    out = []
    for enc_name, tok_name in TOWERS:
        enc, tok = getattr(pipe, enc_name, None), getattr(pipe, tok_name, None)
        if enc is not None and tok is not None:
            out.append((enc_name, tok, enc))
    return out


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` when the tokenizer makes it exactly one token (no special tokens);
    otherwise a UserError naming the pieces."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UserError(
            f"{word!r} is not one token for {type(tokenizer).__name__} (pieces {pieces}): pick another word"
        )
    return int(ids[0])


def input_embedding_modules(encoder: nn.Module) -> list[nn.Embedding]:
    """Every embedding module over the encoder's input-embedding table (T5 keeps two, tied)."""
    weight = encoder.get_input_embeddings().weight
    return [m for m in encoder.modules() if isinstance(m, nn.Embedding) and m.weight is weight]


@contextmanager
def token_rows(pipe, word: str, rows: Mapping[str, Tensor]) -> Iterator[dict[str, int]]:
    """Inside, ``word``'s token embeds as ``rows[name]`` (D,) in the text encoder ``name`` (a key
    of :func:`text_towers`; towers not in ``rows`` are untouched). Gradients flow to the rows.
    Yields {tower name: the word's token id}."""
    towers = {name: (tok, enc) for name, tok, enc in text_towers(pipe)}
    unknown = sorted(set(rows) - set(towers))
    if unknown:
        raise KeyError(f"the pipeline has no text encoder {unknown[0]!r}; it has {sorted(towers)}")
    handles, ids = [], {}
    try:
        for name, row in rows.items():
            tok, enc = towers[name]
            token = single_token_id(tok, word)
            width = enc.get_input_embeddings().weight.shape[1]
            if row.shape != (width,):
                raise ValueError(f"the row for {name} must have shape ({width},), got {tuple(row.shape)}")
            ids[name] = token

            def put(_module, args, output, token=token, row=row):
                mask = (args[0] == token).unsqueeze(-1)
                if not bool(mask.any()):
                    return output
                return torch.where(mask, row.to(output.device, output.dtype), output)

            handles += [m.register_forward_hook(put) for m in input_embedding_modules(enc)]
        yield ids
    finally:
        for h in handles:
            h.remove()
