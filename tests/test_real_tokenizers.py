"""The package's word-to-token mapping on SD 1.x's real CLIP tokenizer (tests/real_tokenizers.py),
where words such as "nudity", "Van Gogh", "Kinkade" or the misspelling "pikachuu" are several
byte-pair pieces, unlike in the word-level toy tokenizers.

Pieces in the released vocabulary (checked below): "nudity" = nu + dity</w>, "Van Gogh" = van</w>
+ gogh</w>, "Thomas Kinkade" = thomas</w> + kin + kade</w>, "pikachuu" = pikach + uu</w>,
"handgun" = hand + gun</w>; "Pikachu" is one token (pikachu</w>, 28107).
"""

from __future__ import annotations

import gzip
import hashlib

import pytest
import torch
from real_tokenizers import (
    BPE_FILE,
    BPE_SHA256,
    N_MERGES,
    VOCAB_SIZE,
    byte_symbols,
    clip_bpe_tokenizer,
    clip_vocab_and_merges,
    pieces,
    prompt_ids,
    shuffled_spans,
    tiny_sd_pipeline_with,
    zeroing_checked,
    zeroing_leaves_alone,
)
from tiny_pipelines import TINY_WORDS

from erasekit.errors import PhraseNotInPrompt, UserError
from erasekit.evaluation.attacks.ring_a_bell import TokenGenome, names_any
from erasekit.methods import eraseanything as ea
from erasekit.methods import keyword_zeroing, uce
from erasekit.models import adapter_for
from erasekit.models.conditioning import run_is_whole_words
from erasekit.models.token_rows import single_token_id, token_rows
from erasekit.toyworld.offline_tokenizers import t5_word_tokenizer

STYLE = "a painting in the style of Van Gogh"
# (prompt, phrase, positions in the 77 encoded ids (BOS at 0), pieces there)
MULTI_PIECE = [
    (STYLE, "Van Gogh", [7, 8], ["van</w>", "gogh</w>"]),
    ("a photo of nudity on a beach", "nudity", [4, 5], ["nu", "dity</w>"]),
    ("a pikachuu plush toy", "pikachuu", [2, 3], ["pikach", "uu</w>"]),
    ("a cottage by Thomas Kinkade, warm light", "Thomas Kinkade", [4, 5, 6], ["thomas</w>", "kin", "kade</w>"]),
    ("a Pikachu plush toy", "Pikachu", [2], ["pikachu</w>"]),
]


@pytest.fixture(scope="module")
def tok():
    return clip_bpe_tokenizer()


@pytest.fixture(scope="module")
def pipe(tok):
    return tiny_sd_pipeline_with(tok)


@pytest.fixture(scope="module")
def adapter(pipe):
    return adapter_for(pipe)


def _reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one lower-case ASCII word, written out: start from its characters
    ("</w>" on the last), merge the adjacent pair of lowest rank until none is a merge."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


# ---- the tokenizer itself ----------------------------------------------------------------------


def test_vendored_merges_file_is_the_described_one():
    data = BPE_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == BPE_SHA256 and len(data) == 1_356_917
    licence = (BPE_FILE.parent / "LICENSE").read_text()
    assert "Copyright (c) 2021 OpenAI" in licence and "Gabriel Ilharco" in licence
    assert licence.count("Permission is hereby granted") == 2
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    assert lines[0].endswith("#version: 0.2") and len(lines) > N_MERGES + 1


def test_vocabulary_is_built_as_clip_defines_it(tok):
    vocab, merges = clip_vocab_and_merges()
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and symbols[:3] == ["!", '"', "#"] and symbols[-1] == chr(256 + 67)
    assert len(tok) == VOCAB_SIZE == 49408 and len(merges) == N_MERGES == 48894
    # "a" is the 65th printable byte (97 - 33): 64 alone, 256 + 64 as a word end.
    assert vocab["a"] == 64 and vocab["a</w>"] == 320
    # Merge line n of the file is id 511 + n.
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    assert lines.index("o f</w>") == 28 and vocab["of</w>"] == 539
    assert lines.index("c at</w>") == 1857 and vocab["cat</w>"] == 2368
    photo = next(n for n in range(1, N_MERGES + 1) if lines[n].replace(" ", "") == "photo</w>")
    assert vocab["photo</w>"] == 511 + photo == 1125
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    # SD 1.x's tokenizer: BOS, the words, EOS; padded with EOS to 77.
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = prompt_ids(tok, "a photo of a cat")
    assert len(ids) == 77 and ids[7:] == [49407] * 70


def test_words_split_as_byte_pair_encoding_says(tok):
    _, merges = clip_vocab_and_merges()
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    for word in ("nudity", "pikachuu", "kinkade", "handgun", "photo", "pikachu", "gogh", "crudity"):
        assert pieces(tok, word) == _reference_bpe(word, ranks), word
    assert pieces(tok, "Nudity") == ["nu", "dity</w>"]  # lower-cased first
    assert pieces(tok, "Van Gogh's") == ["van</w>", "gogh</w>", "'s</w>"]


# ---- token indices -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, phrase, positions, expected", MULTI_PIECE)
def test_token_indices_hold_every_piece(adapter, tok, prompt, phrase, positions, expected):
    assert pieces(tok, phrase) == expected
    assert adapter.token_indices(prompt, phrase) == positions
    ids = prompt_ids(tok, prompt)
    assert tok.convert_ids_to_tokens([ids[i] for i in positions]) == expected
    assert adapter.encode([prompt]).embeds.shape[1] == len(ids) == 77


def test_repeated_multi_piece_word_gives_a_span_each(adapter):
    prompt = "nudity, then more nudity"
    assert adapter.token_spans(prompt, "nudity") == [[1, 2], [6, 7]]
    assert adapter.token_indices(prompt, "nudity") == [1, 2, 6, 7]


def test_case_and_punctuation(adapter, tok):
    # CLIP lower-cases: every spelling is the same ids, so the same positions.
    for phrase in ("Van Gogh", "van gogh", "VAN GOGH", " Van Gogh "):
        assert adapter.token_indices(STYLE, phrase) == [7, 8]
    for prompt in ("a painting in the style of van gogh", "a painting in the style of VAN  GOGH!"):
        assert adapter.token_indices(prompt, "Van Gogh") == [7, 8]
    # Punctuation around the words is its own token: the span is the words' pieces only.
    assert adapter.token_indices("Van Gogh, oil on canvas", "Van Gogh") == [1, 2]
    assert adapter.token_indices("Van Gogh's starry night", "Van Gogh") == [1, 2]
    assert adapter.token_indices("a (nudity) photo", "nudity") == [3, 4]
    # Punctuation inside the phrase is part of the phrase: its token is in the span, and a
    # prompt with other punctuation there does not hold the phrase.
    prompt = "Van Gogh, oil on canvas"
    assert adapter.token_indices(prompt, "Van Gogh,") == [1, 2, 3]
    assert tok.convert_ids_to_tokens(prompt_ids(tok, prompt)[3]) == ",</w>"
    with pytest.raises(PhraseNotInPrompt):
        adapter.token_indices("Van Gogh. oil on canvas", "Van Gogh,")


@pytest.mark.parametrize(
    "prompt, phrase",
    [
        ("a pikachuu plush toy", "pikachu"),  # the misspelling is another word
        ("a Pikachu plush toy", "pikachuu"),
        ("the crudity of it", "nudity"),  # shares the last piece dity</w>
        ("a man with a handgun", "gun"),  # hand + gun</w>: gun</w> is not the word "gun"
        ("vincentvan gogh", "Van Gogh"),  # vincent + van</w> + gogh</w>
        ("a painting in the style of Monet", "Van Gogh"),
    ],
)
def test_phrase_absent_is_the_clear_error(adapter, prompt, phrase):
    with pytest.raises(PhraseNotInPrompt) as err:
        adapter.token_indices(prompt, phrase)
    assert repr(phrase) in str(err.value) and repr(prompt) in str(err.value)
    assert isinstance(err.value, (UserError, ValueError))


def test_phrase_truncated_away_is_the_clear_error(adapter):
    prompt = "a photo of " + "a red car " * 30 + "with nudity"
    with pytest.raises(PhraseNotInPrompt, match="first 77 tokens"):
        adapter.token_indices(prompt, "nudity")
    # Cut between its pieces: not found either (half a word is not the word).
    head = "a " * 74  # BOS + 74 + "nu" = 76 ids, then "dity</w>" is cut by EOS at 76
    assert prompt_ids(adapter.pipe.tokenizer, head + "nudity")[75] == 1156
    with pytest.raises(PhraseNotInPrompt):
        adapter.token_indices(head + "nudity", "nudity")


# ---- keyword zeroing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, concept",
    [(p, c) for p, c, _, _ in MULTI_PIECE[:4]] + [("a man with a handgun and a gun", "gun")],
)
def test_keyword_zeroing_zeroes_every_piece_and_nothing_else(pipe, adapter, prompt, concept):
    base, edited, _, others = zeroing_checked(pipe, adapter, prompt, concept)
    for name, rows in edited.items():  # cross attention: the other rows are the base model's everywhere
        assert torch.equal(rows[others], base[name][others]), name


def test_keyword_zeroing_leaves_prompts_without_the_word_alone(pipe, adapter):
    prompts = ["a man with a handgun", "the crudity of it", "a Pikachu plush toy", "vincentvan gogh"]
    assert zeroing_leaves_alone(pipe, adapter, prompts, ("gun", "nudity", "pikachuu", "Van Gogh")) == []


def test_keyword_runs_are_whole_words_for_both_tokenizer_families(tok):
    ids = prompt_ids(tok, "a handgun and a gun")
    (gun,) = tok("gun", add_special_tokens=False)["input_ids"]
    starts = [i for i, x in enumerate(ids) if x == gun]
    assert len(starts) == 2  # hand + gun</w>, then gun</w>
    special = set(tok.all_special_ids)
    assert [run_is_whole_words(tok, ids, i, i + 1, special) for i in starts] == [False, True]
    runs = keyword_zeroing.keyword_id_runs(tok, ["gun"])
    assert keyword_zeroing.find_runs(ids, runs, special) == starts  # ids alone: both
    assert keyword_zeroing.find_runs(ids, runs, special, tok) == starts[1:]
    # T5 marks word starts instead ("\u2581car" + "s" is "cars"): the piece after counts.
    t5 = t5_word_tokenizer(TINY_WORDS)
    ids = t5("a car and cars")["input_ids"]
    runs = keyword_zeroing.keyword_id_runs(t5, ["car"])
    assert len(keyword_zeroing.find_runs(ids, runs, set(t5.all_special_ids))) == 2
    assert keyword_zeroing.find_runs(ids, runs, set(t5.all_special_ids), t5) == [1]


def test_keyword_case_variants_find_a_name_in_title_case():
    # A case-sensitive T5 tokenizer spells "Van Gogh" differently from "Van gogh" and "van gogh".
    t5 = t5_word_tokenizer([*TINY_WORDS, "van", "gogh"])
    ids = t5("a painting by Van Gogh")["input_ids"]
    special = set(t5.all_special_ids)
    assert keyword_zeroing.find_runs(ids, keyword_zeroing.keyword_id_runs(t5, ["van gogh"], False), special) == []
    found = keyword_zeroing.find_runs(ids, keyword_zeroing.keyword_id_runs(t5, ["van gogh"]), special, t5)
    assert t5.decode([ids[i] for i in found]) == "Van Gogh"


# ---- EraseAnything's prompt shuffling ----------------------------------------------------------


@pytest.mark.parametrize("concept", ["Van Gogh", "nudity", "Thomas Kinkade"])
def test_shuffled_prompts_keep_the_concept_whole_and_its_indices_right(adapter, tok, concept):
    prompt = f"a painting of {concept}, in the style of {concept} at dusk"
    rewrites, moved = shuffled_spans(adapter, tok, prompt, concept)
    for _, word, idx, ids in rewrites:  # on CLIP a word's pieces are the same in any context
        assert [ids[i] for i in idx] == tok(word, add_special_tokens=False)["input_ids"] * 2
    assert moved >= 8


def test_eraseanything_plans_its_indices_after_the_rewrite(adapter, tok):
    config = ea.EraseAnythingConfig(
        synonyms="pikachuu,Thomas Kinkade",
        irrelevant="dog,nudity",
        shuffle_prob=1.0,
        synonym_prob=0.5,
        preserve_images=1,
        rollout_steps=3,
        rsc_steps=2,
        rsc_irrelevant=2,
    )
    trainer = ea._Trainer(
        adapter, "Van Gogh", config, ["pikachuu", "Thomas Kinkade"], ["dog", "nudity"], torch.Generator(), 24
    )
    words = {"Van Gogh", "pikachuu", "Thomas Kinkade"}
    seen = set()
    for prompt, idx in trainer.plan:
        word = next(w for w in words if w in prompt)
        seen.add(word)
        ids = prompt_ids(tok, prompt)
        assert [ids[i] for i in idx] == tok(word, add_special_tokens=False)["input_ids"], prompt
    assert seen == words
    assert trainer.rsc_idx == adapter.token_indices(trainer.rsc_prompt, "Van Gogh") and len(trainer.rsc_idx) == 2
    (_, dog_idx), (_, nudity_idx) = trainer.ir_rsc
    assert len(dog_idx) == 1 and len(nudity_idx) == 2


# ---- the other places that map words to tokens -------------------------------------------------


def test_single_token_words_and_learned_rows(pipe, tok):
    assert single_token_id(tok, "Pikachu") == 28107
    with pytest.raises(UserError, match=r"'nudity' is not one token .*\['nu', 'dity</w>'\]"):
        single_token_id(tok, "nudity")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    with pytest.raises(UserError, match="pikach"):
        with token_rows(pipe, "pikachuu", {"text_encoder": torch.zeros(width)}):
            pass
    with token_rows(pipe, "Pikachu", {"text_encoder": torch.zeros(width)}) as ids:
        assert ids == {"text_encoder": 28107}


def test_uce_reads_the_last_piece_of_the_concept(pipe, tok):
    config = uce.UCEConfig(templates="{concept};a painting in the style of {concept}", preserve="Thomas Kinkade")
    edit = uce.fit(pipe, "Van Gogh;nudity", config, progress=False)
    hp = edit.hyperparameters
    assert hp["erase_prompts"] == ["Van Gogh", STYLE, "nudity", "a painting in the style of nudity"]
    # gogh</w> (2, 8) and dity</w> (2, 8); the empty guide: 0; kade</w> of the preserved prompt: 3.
    assert hp["token_positions"] == [2, 8, 2, 8, 0, 3]
    for prompt, pos in zip(hp["erase_prompts"] + ["", "Thomas Kinkade"], hp["token_positions"]):
        if prompt:
            assert tok.convert_ids_to_tokens(prompt_ids(tok, prompt)[pos]).endswith("</w>")


def test_unfamiliar_words_lists_words_spelled_out(adapter):
    # Two pieces is a word the model reads as such; more (or unknown pieces) is flagged.
    assert adapter.unfamiliar_words("nudity; Van Gogh, pikachuu, Thomas Kinkade") == []
    assert adapter.unfamiliar_words("a nudityx photo") == [("nudityx", ["nu", "d", "ity", "x</w>"])]


def test_ring_a_bell_bans_one_token_words_and_rejects_spelled_out_ones(tok):
    genome = TokenGenome(tok, 77, 4, banned_words=["Pikachu", "nudity"])
    assert 28107 not in genome.vocab  # pikachu</w>: the word's own token
    nu, dity = tok("nudity", add_special_tokens=False)["input_ids"]
    assert nu in genome.vocab and dity in genome.vocab  # pieces, not the word
    # Pieces that spell a banned word are caught on the decoded text instead.
    text = genome.decode([320, nu, dity, 1125])
    assert text == "a nudity photo" and names_any(text, ["Pikachu", "nudity"]) == "nudity"
    assert names_any(genome.decode([320, 1815, dity]), ["nudity"]) is None  # "a crudity"
