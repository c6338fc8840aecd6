"""The package's word-to-token mapping on FLUX.1's real T5 tokenizer (SentencePiece unigram,
tests/real_tokenizers.py), where words split into pieces that carry a word-start marker
("\u2581") on the first one only, case is kept, and there is no BOS.

Pieces in the released vocabulary (checked below): "nudity" = \u2581nu + d + ity, "Van Gogh" =
\u2581Van + \u2581Go + g + h, "Pikachu" = \u2581P + ika + chu, "pikachuu" = \u2581pi + ka + chu + u,
"Thomas Kinkade" = \u2581Thomas + \u2581Kin + ka + de, "handgun" = \u2581hand + gun; a prompt's
leading "a" is two tokens (\u2581 + a).
"""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest
import torch
from real_tokenizers import (
    T5_FILE,
    T5_SHA256,
    T5_VOCAB_SIZE,
    pieces,
    prompt_ids,
    shuffled_spans,
    t5_unigram_tokenizer,
    tiny_flux_pipeline_with,
    zeroing_checked,
    zeroing_leaves_alone,
)
from tiny_pipelines import TEXT_LEN

from erasekit.errors import PhraseNotInPrompt, UserError
from erasekit.models import adapter_for
from erasekit.models.token_rows import single_token_id, token_rows

M = "\u2581"  # SentencePiece's word-start marker
STYLE = "a painting in the style of Van Gogh"
# (prompt, phrase, positions in the encoded ids (no BOS), pieces there)
MULTI_PIECE = [
    (STYLE, "Van Gogh", [7, 8, 9, 10], [M + "Van", M + "Go", "g", "h"]),
    ("a photo of nudity on a beach", "nudity", [4, 5, 6], [M + "nu", "d", "ity"]),
    ("a pikachuu plush toy", "pikachuu", [2, 3, 4, 5], [M + "pi", "ka", "chu", "u"]),
    ("a cottage by Thomas Kinkade, warm light", "Thomas Kinkade", [4, 5, 6, 7], [M + "Thomas", M + "Kin", "ka", "de"]),
    ("a Pikachu plush toy", "Pikachu", [2, 3, 4], [M + "P", "ika", "chu"]),
]


@pytest.fixture(scope="module")
def tok():
    return t5_unigram_tokenizer(model_max_length=TEXT_LEN)


@pytest.fixture(scope="module")
def pipe(tok):
    return tiny_flux_pipeline_with(tok)


@pytest.fixture(scope="module")
def adapter(pipe):
    return adapter_for(pipe)


# ---- the tokenizer itself ----------------------------------------------------------------------


def test_vendored_file_is_the_described_one(tok):
    data = T5_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == T5_SHA256
    licence = (T5_FILE.parent / "LICENSE").read_text()
    assert "Apache License, Version 2.0" in licence and "Copyright (c) 2023 leejet" in licence
    spec = json.loads(gzip.decompress(data))
    assert spec["model"]["type"] == "Unigram" and len(spec["model"]["vocab"]) == T5_VOCAB_SIZE == 32100
    assert len(tok) == 32100
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, None)
    assert tok.convert_tokens_to_ids([M + "the", "<extra_id_0>", "<extra_id_99>"]) == [8, 32099, 32000]
    # No BOS; EOS after the words; padded with <pad> (0).
    assert tok("the cat")["input_ids"] == [8, 1712, 1]
    ids = prompt_ids(tok, "a photo of a cat")
    assert len(ids) == TEXT_LEN and ids[:8] == [3, 9, 1202, 13, 3, 9, 1712, 1] and set(ids[8:]) == {0}


def test_words_split_into_marked_pieces(tok):
    assert pieces(tok, "nudity") == [M + "nu", "d", "ity"]
    assert pieces(tok, "Nudity") == [M + "Nu", "d", "ity"]  # case is kept: other ids
    assert pieces(tok, "handgun") == [M + "hand", "gun"] and pieces(tok, "gun") == [M + "gun"]
    assert pieces(tok, "crudity") == [M + "cru", "d", "ity"]  # shares d + ity with nudity


# ---- token indices -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, phrase, positions, expected", MULTI_PIECE)
def test_token_indices_hold_every_piece(adapter, tok, prompt, phrase, positions, expected):
    assert pieces(tok, phrase) == expected
    assert adapter.token_indices(prompt, phrase) == positions
    ids = prompt_ids(tok, prompt)
    assert tok.convert_ids_to_tokens([ids[i] for i in positions]) == expected
    assert adapter.encode([prompt]).embeds.shape[1] == len(ids) == TEXT_LEN


def test_repeated_multi_piece_word_gives_a_span_each(adapter, tok):
    # T5's offsets put the space before a word inside its first piece ("▁nu" of " nu"):
    # the word-boundary check must not read that space's left neighbour.
    prompt = "nudity, then more nudity"
    assert tok(prompt, return_offsets_mapping=True)["offset_mapping"][6] == (17, 20)
    assert adapter.token_spans(prompt, "nudity") == [[0, 1, 2], [6, 7, 8]]
    assert adapter.token_spans("Van Gogh and Van Gogh", "Van Gogh") == [[0, 1, 2, 3], [5, 6, 7, 8]]


def test_case_and_punctuation(adapter, tok):
    # T5 keeps case, so "van gogh" is other ids; the phrase is still found in either spelling.
    assert pieces(tok, "van gogh") != pieces(tok, "Van Gogh")
    assert adapter.token_indices("a painting in the style of van gogh", "Van Gogh") == [7, 8, 9, 10]
    assert adapter.token_indices("Van Gogh's starry night", "Van Gogh") == [0, 1, 2, 3]
    # After "(" the word loses its marker and splits again (n u d ity): found by its text.
    prompt = "a (nudity) photo"
    idx = adapter.token_indices(prompt, "nudity")
    assert tok.decode([prompt_ids(tok, prompt)[i] for i in idx]) == "nudity" and len(idx) == 4


@pytest.mark.parametrize(
    "prompt, phrase",
    [
        ("a pikachuu plush toy", "pikachu"),  # the misspelling is another word
        ("the crudity of it", "nudity"),  # shares the pieces d + ity
        ("a man with a handgun", "gun"),  # hand + gun: gun without the marker is not the word
        ("a painting in the style of Monet", "Van Gogh"),
    ],
)
def test_phrase_absent_is_the_clear_error(adapter, prompt, phrase):
    with pytest.raises(PhraseNotInPrompt) as err:
        adapter.token_indices(prompt, phrase)
    assert repr(phrase) in str(err.value) and repr(prompt) in str(err.value)


def test_phrase_truncated_away_is_the_clear_error(adapter):
    prompt = "a photo of " + "a red car " * 10 + "with nudity"
    with pytest.raises(PhraseNotInPrompt, match=f"first {TEXT_LEN} tokens"):
        adapter.token_indices(prompt, "nudity")


# ---- keyword zeroing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, concept",
    [(p, c) for p, c, _, _ in MULTI_PIECE[:4]] + [("a man with a handgun and a gun", "gun")],
)
def test_keyword_zeroing_zeroes_every_piece_and_nothing_else(pipe, adapter, prompt, concept):
    base, edited, _, others = zeroing_checked(pipe, adapter, prompt, concept)
    # Joint attention: the text stream after the first block has read the zeroed values, so only
    # the first block's other rows are the base model's.
    first = "transformer_blocks.0.attn.add_v_proj"
    assert torch.equal(edited[first][others], base[first][others])


def test_keyword_zeroing_leaves_prompts_without_the_word_alone(pipe, adapter):
    prompts = ["a man with a handgun", "the crudity of it", "a Pikachu plush toy"]
    assert zeroing_leaves_alone(pipe, adapter, prompts, ("gun", "nudity", "pikachuu")) == []


# ---- EraseAnything's prompt shuffling ----------------------------------------------------------


@pytest.mark.parametrize("concept", ["Van Gogh", "nudity", "Thomas Kinkade"])
def test_shuffled_prompts_keep_the_concept_whole_and_its_indices_right(adapter, tok, concept):
    rewrites, moved = shuffled_spans(adapter, tok, f"a painting of {concept}, in the style of {concept}", concept)
    assert all(len(idx) >= 6 for _, _, idx, _ in rewrites) and moved >= 8  # every word here is 3+ pieces


# ---- the other places that map words to tokens -------------------------------------------------


def test_single_token_words_and_learned_rows(pipe, tok):
    assert single_token_id(tok, "cat") == 1712
    with pytest.raises(UserError, match=r"'nudity' is not one token"):
        single_token_id(tok, "nudity")
    width = pipe.text_encoder_2.get_input_embeddings().weight.shape[1]
    with token_rows(pipe, "cat", {"text_encoder_2": torch.zeros(width)}) as ids:
        assert ids["text_encoder_2"] == 1712


def test_unfamiliar_words_flags_spelled_out_words_not_three_piece_ones(adapter):
    # SentencePiece splits words a model reads well into three pieces: not flagged.
    assert adapter.unfamiliar_words("nudity; pikachuu, Thomas Kinkade") == []
    # Spelled out letter by letter after the first piece: flagged.
    assert adapter.unfamiliar_words("a nudityx photo") == [("nudityx", [M + "nu", "d", "ity", "x"])]
    assert adapter.unfamiliar_words("Van Gogh") == [("Gogh", [M + "Go", "g", "h"])]
