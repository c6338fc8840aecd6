"""Real tokenizers for tests, built offline: CLIP's byte-level BPE with its 49408-token vocabulary
(SD 1.x), and T5's SentencePiece unigram vocabulary of 32100 tokens (FLUX.1's tokenizer_2; from
the JSON vendored in tests/data/t5_unigram, see its LICENSE).

The released CLIP vocabulary (SD 1.x's tokenizer) splits words such as "nudity", "Van Gogh" or
"Pikachu" into several pieces, where the word-level toy tokenizers keep them whole. Built from
the merges file vendored in tests/data/clip_bpe (see its LICENSE), the way CLIP defines its
vocabulary:

- every byte 0..255 is a symbol: the printable bytes ('!'..'~', then U+00A1..U+00AC, then
  U+00AE..U+00FF) stand for themselves, in that order, and the remaining 68 bytes (space, control
  characters, ...) are mapped in increasing order to U+0100, U+0101, ...; ids 0..255 are these
  256 symbols in that order, ids 256..511 the same symbols with "</w>" (end of word) appended;
- the merges file's first line is a version header; its lines 1..48894 (48894 = 49152 - 256 - 2)
  are the merges, and merge line n adds the joined pair as id 511 + n;
- "<|startoftext|>" is 49406 and "<|endoftext|>" 49407 (also the padding, as in SD 1.x).

So "a" alone is byte 97, the 65th printable byte (97 - 33 = 64): "a</w>" is 256 + 64 = 320; the
merge "o f</w>" is line 28 of the file: "of</w>" is 511 + 28 = 539; "c at</w>" is line 1857:
"cat</w>" is 2368. tests/test_real_tokenizers.py checks these against the built tokenizer.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPTokenizer, T5TokenizerFast

from erasekit.edits import apply, remove
from erasekit.methods import keyword_zeroing

BPE_FILE = Path(__file__).resolve().parent / "data" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_MERGES = 49152 - 256 - 2  # 48894
VOCAB_SIZE = 2 * 256 + N_MERGES + 2  # 49408
T5_FILE = Path(__file__).resolve().parent / "data" / "t5_unigram" / "tokenizer.json.gz"
T5_SHA256 = "fdc1945f69027833709ac6976273c25ce523960c0d20b041f13e4ca900a15dd3"
T5_VOCAB_SIZE = 32100  # 32000 pieces + 100 <extra_id_*>
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # 49406, 49407


def byte_symbols() -> list[str]:
    """The 256 one-character symbols of byte-level BPE, in vocabulary order (see the module doc)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id for all 49408 tokens, the 48894 merge lines "left right") from the vendored file."""
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(lines[1 : N_MERGES + 1])
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise AssertionError(f"CLIP's vocabulary must hold {VOCAB_SIZE} distinct tokens, got {len(vocab)}")
    return vocab, merges


def clip_bpe_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """SD 1.x's CLIP tokenizer (49408 tokens, BOS 49406, EOS = pad = 49407), built offline:
    vocab.json and merges.txt are written into a temporary folder and loaded from there."""
    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="clip-bpe-") as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            folder,
            model_max_length=model_max_length,
            bos_token=BOS,
            eos_token=EOS,
            unk_token=EOS,
            pad_token=EOS,
        )


def t5_unigram_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """FLUX.1's T5 tokenizer (32100 tokens; pad 0, EOS 1, unk 2; no BOS), built offline from
    the vendored tokenizer.json."""
    with tempfile.TemporaryDirectory(prefix="t5-unigram-") as folder:
        path = Path(folder, "tokenizer.json")
        path.write_bytes(gzip.decompress(T5_FILE.read_bytes()))
        return T5TokenizerFast(tokenizer_file=str(path), model_max_length=model_max_length)


def tiny_flux_pipeline_with(t5_tokenizer, seed: int = 0):
    """The tiny Flux pipeline of tests/tiny_pipelines.py with ``t5_tokenizer`` as tokenizer_2:
    its T5 encoder (width 32) has one embedding row per token and reads
    ``t5_tokenizer.model_max_length`` positions (the pipeline's max_sequence_length)."""
    from tiny_pipelines import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=seed, t5_tokenizer=t5_tokenizer)
    assert pipe.text_encoder_2.get_input_embeddings().weight.shape[0] == len(t5_tokenizer)
    return pipe


def tiny_sd_pipeline_with(tokenizer, seed: int = 0):
    """The tiny SD pipeline of tests/tiny_pipelines.py with ``tokenizer``: its CLIP text encoder
    (width 32) has one embedding row per token (49408 with :func:`clip_bpe_tokenizer`) and reads
    ``tokenizer.model_max_length`` positions."""
    from tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=seed, tokenizer=tokenizer)
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)
    return pipe


def pieces(tokenizer, text: str) -> list[str]:
    """How ``tokenizer`` splits ``text`` (no special tokens), as token strings."""
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``prompt``'s ids as the SD pipeline encodes it (BOS, EOS, padding to the maximum length)."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)["input_ids"]


def value_rows(adapter, prompt: str) -> dict[str, torch.Tensor]:
    """The text value projections' outputs (L, D) of one denoiser pass on ``prompt``, by module."""
    points = [p for p in adapter.attachment_points("text_proj") if p.role == "v"]
    out: dict[str, torch.Tensor] = {}
    handles = [
        p.module.register_forward_hook(lambda _m, _a, o, name=p.name: out.__setitem__(name, o[0].clone()))
        for p in points
    ]
    g = torch.Generator().manual_seed(0)
    x, t = adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)
    try:
        with torch.no_grad():
            adapter.predict(x, t, adapter.encode([prompt]))
    finally:
        for h in handles:
            h.remove()
    assert len(out) == len(points) > 0
    return out


def zeroed_rows(pipe, adapter, prompt: str, concept: str) -> tuple[dict, dict, list[int]]:
    """(value rows without, with a keyword-zeroing edit of ``concept``, the positions the edit's
    hook found in the encoder's ids for ``prompt``)."""
    base = value_rows(adapter, prompt)
    edit = keyword_zeroing.fit(pipe, concept)
    apply(pipe, edit)
    try:
        hook = adapter.edit_stack.attached[edit.id]
        edited = value_rows(adapter, prompt)
        found = hook.seen[-1][1].nonzero().flatten().tolist()
    finally:
        remove(pipe, edit)
    return base, edited, found


def zeroing_checked(pipe, adapter, prompt: str, concept: str):
    """Keyword zeroing of ``concept`` on ``prompt``, checked where both tokenizers agree: the
    hook's positions are :meth:`token_indices`' and hold the concept's ids, and every keyword
    row is zero in every block. Returns (base rows, edited rows, keyword positions, the other
    positions of the encoded prompt)."""
    tok, _ = adapter.main_text_encoder()
    base, edited, found = zeroed_rows(pipe, adapter, prompt, concept)
    expected = adapter.token_indices(prompt, concept)
    assert found == expected
    ids = adapter.main_token_ids([prompt])[0].tolist()
    assert [ids[i] for i in found] == tok(concept, add_special_tokens=False)["input_ids"]
    for name, rows in edited.items():
        assert torch.all(rows[expected] == 0), name
        assert base[name][expected].abs().max() > 0
    return base, edited, expected, [i for i in range(len(ids)) if i not in expected]


def zeroing_leaves_alone(pipe, adapter, prompts, concepts) -> list[str]:
    """The ``prompts`` whose value rows change when keyword-zeroing edits of ``concepts`` (none
    of which the prompts hold) are applied together: should be none."""
    base = {p: value_rows(adapter, p) for p in prompts}
    edits = [keyword_zeroing.fit(pipe, c) for c in concepts]
    for edit in edits:
        apply(pipe, edit)
    try:
        return [p for p in prompts if not all(torch.equal(v, base[p][k]) for k, v in value_rows(adapter, p).items())]
    finally:
        for edit in edits:
            remove(pipe, edit)


def shuffled_spans(adapter, tokenizer, prompt: str, concept: str, tries: int = 12) -> tuple[list, int]:
    """EraseAnything's shuffled rewrites of ``prompt``, which names ``concept`` twice (seed 0,
    ``tries`` of them), checked: the rewrite still names its word twice, and its token indices are
    two contiguous spans of equal length that each decode to the word (in any case). Returns the (new prompt,
    word, indices, prompt ids) of each rewrite and how many of them moved the indices."""
    from erasekit.methods import eraseanything as ea

    g = torch.Generator().manual_seed(0)
    out, moved = [], 0
    for _ in range(tries):
        new, word = ea.rewrite_prompt(prompt, concept, ["pikachuu"], g, shuffle_prob=1.0, synonym_prob=0.3)
        assert new.count(word) == 2, new  # every occurrence moves as one unit
        idx = adapter.token_indices(new, word)
        ids = prompt_ids(tokenizer, new)
        k = len(idx) // 2
        assert len(idx) == 2 * k and idx[k - 1] - idx[0] == k - 1 and idx[-1] - idx[k] == k - 1, (new, idx)
        spans = {tokenizer.decode([ids[i] for i in span]).lower() for span in (idx[:k], idx[k:])}
        assert spans == {word.lower()}, (new, spans)  # CLIP lower-cases
        moved += idx != adapter.token_indices(prompt, concept)
        out.append((new, word, idx, ids))
    return out, moved
