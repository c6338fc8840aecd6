"""token_spans / token_indices on both families' tokenizers (CLIP for SD, T5 for Flux)."""

import pytest


def _ids(adapter, prompt):
    tokenizer, max_length = adapter._main_tokenizer()
    return tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]


def test_known_word_positions_index_the_embeddings(family_adapter):
    adapter = family_adapter
    prompt = "a photo of a red car"
    offset = 1 if adapter.family == "sd" else 0  # CLIP has a BOS token, T5 none
    assert adapter.token_spans(prompt, "red") == [[4 + offset]]
    assert adapter.token_spans(prompt, "red car") == [[4 + offset, 5 + offset]]
    assert adapter.token_indices(prompt, "car") == [5 + offset]
    assert adapter.encode([prompt]).embeds.shape[1] == len(_ids(adapter, prompt))


def test_unknown_word_returns_all_its_pieces(family_adapter):
    adapter = family_adapter
    tokenizer, _ = adapter._main_tokenizer()
    pieces = tokenizer("zebra", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1  # not in the tiny vocabulary: split into sub-word pieces
    prompt = "a zebra in the garden"
    (span,) = adapter.token_spans(prompt, "zebra")
    assert span == list(range(span[0], span[0] + len(pieces)))
    assert [_ids(adapter, prompt)[i] for i in span] == pieces
    # "a" must not match the last piece of "zebra" (which is "a" too).
    assert adapter.token_spans(prompt, "a") == [[span[0] - 1]]


def test_repeated_word_gives_two_spans(family_adapter):
    spans = family_adapter.token_spans("a dog and a dog in the park", "dog")
    assert len(spans) == 2 and spans[0][0] < spans[1][0]
    assert family_adapter.token_indices("a dog and a dog in the park", "dog") == spans[0] + spans[1]


def test_indices_follow_the_word_when_the_prompt_is_shuffled(family_adapter):
    adapter = family_adapter
    words = "a photo of a teddy bear in the garden".split()
    shuffled = " ".join(["garden", "teddy", "bear", "the", "in", "a", "photo", "of", "a"])
    before = adapter.token_indices(" ".join(words), "teddy bear")
    after = adapter.token_indices(shuffled, "teddy bear")
    assert before != after
    offset = 1 if adapter.family == "sd" else 0
    assert after == [1 + offset, 2 + offset]
    ids = _ids(adapter, shuffled)
    tokenizer, _ = adapter._main_tokenizer()
    assert [ids[i] for i in after] == tokenizer("teddy bear", add_special_tokens=False)["input_ids"]


def test_missing_or_truncated_phrase_is_an_error_naming_both(family_adapter):
    with pytest.raises(ValueError) as err:
        family_adapter.token_spans("a photo of a red car", "teddy bear")
    assert "teddy bear" in str(err.value) and "a photo of a red car" in str(err.value)
    long_prompt = "a photo of " + "a red car " * 20 + "and a dog"
    with pytest.raises(ValueError, match="dog"):
        family_adapter.token_spans(long_prompt, "dog")
    with pytest.raises(ValueError):
        family_adapter.token_spans("a red car", "  ")


def test_case_and_punctuation(family_adapter):
    adapter = family_adapter
    spans = adapter.token_spans("A red car, in the garden.", "car")
    assert len(spans) == 1
    # T5 splits "(car)" differently from "car": found through the text offsets instead.
    spans = adapter.token_spans("a photo of a (car)", "car")
    assert len(spans) == 1
    with pytest.raises(ValueError):
        adapter.token_spans("a red cart", "car")
