"""Adversaries in the token-INPUT space, shared by the methods that train against them.

A soft token is a free vector in a text encoder's input-embedding space (before position
embeddings), one per text encoder (SD: CLIP; Flux: CLIP and T5), standing in for a word of the
prompt: while a prompt is encoded inside :func:`with_soft_tokens`, each occurrence of the word's
token embeds as the vector instead of the table's row (:func:`erasekit.models.token_rows.token_rows`),
differentiably; the tables and every other position stay exactly as they were. This is the space
textual inversion (Pham et al. 2024) and AdvUnlearn's attacker (Zhang et al. 2024) work in: a
prompt whose words carry no trace of the concept can still bring it back through such a vector.

- AdvUnlearn inserts soft tokens after BOS, standing in for :func:`placeholder_words`;
- Receler's ``adv_space="input"`` (our extension) replaces the concept's own word
  (:func:`attack_word`), towards the frozen model's prediction or, with ``adv_images``, as
  textual inversion does: denoising noised latents of the concept's own images
  (:func:`frozen_images`, :func:`noised_latent`); EraseAnything's ``adv_images`` (our
  extension) does the latter.

Rows are float32 tensors keyed by the tower's component name: ``{"text_encoder": (k, D), ...}``.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor

from ..errors import UserError
from ..models import Conditioning, frozen
from ..models.token_rows import single_token_id, text_towers, token_rows
from .losses import prediction_loss

# Placeholder words for inserted soft tokens, in order of preference: each must be one token in
# every text encoder and absent from the prompt.
PLACEHOLDERS = ("mark", "the", "a", "of", "an", "and", "with", "on", "in", "at")


def placeholder_words(pipe, prompt: str, k: int) -> list[str]:
    """``k`` words of :data:`PLACEHOLDERS` that are one token in every text encoder and not in
    ``prompt``: the soft tokens' stand-ins. ValueError when fewer exist."""
    used = {w.lower() for w in prompt.split()}
    out = []
    for word in PLACEHOLDERS:
        if word in used:
            continue
        if all(len(tok(word, add_special_tokens=False)["input_ids"]) == 1 for _, tok, _ in text_towers(pipe)):
            out.append(word)
        if len(out) == k:
            return out
    raise ValueError(
        f"only {len(out)} placeholder words fit this pipeline's tokenizers; lower attack_tokens to {len(out)}"
    )


def random_rows(pipe, names: list[str], k: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Tower name -> (k, D) input-embedding rows of ``k`` vocabulary tokens drawn from ``generator``."""
    out = {}
    for name, _, enc in text_towers(pipe):
        if name in names:
            table = enc.get_input_embeddings().weight
            ids = torch.randint(0, table.shape[0], (k,), generator=generator)
            out[name] = table[ids].detach().float().clone()
    return out


def with_soft_tokens(pipe, words: list[str], rows: dict[str, Tensor] | None) -> ExitStack:
    """A context in which ``words[j]`` embeds as ``rows[tower][j]`` in every tower (none: a no-op)."""
    stack = ExitStack()
    if rows:
        for j, word in enumerate(words):
            stack.enter_context(token_rows(pipe, word, {n: r[j] for n, r in rows.items()}))
    return stack


def word_rows(pipe, word: str) -> dict[str, Tensor]:
    """Tower name -> (1, D) float32 copy of ``word``'s input-embedding row; a UserError naming the
    pieces when ``word`` is not one token in every text encoder."""
    out = {}
    for name, tok, enc in text_towers(pipe):
        pieces = tok.tokenize(word)
        if len(pieces) != 1:
            raise UserError(
                f"{word!r} is not one token for the {name} tokenizer (pieces {pieces}): an input-space "
                "adversary stands in for one token"
            )
        row = enc.get_input_embeddings().weight[single_token_id(tok, word)]
        out[name] = row.detach().float().clone()[None]
    return out


def table_scales(pipe) -> dict[str, float]:
    """Tower name -> the standard deviation of its token-embedding table: a step size in these
    units fits CLIP (std ~0.01) and T5 (std ~1) alike."""
    return {
        name: float(enc.get_input_embeddings().weight.detach().float().std()) for name, _, enc in text_towers(pipe)
    }


def frozen_images(adapter, prompts: list[str], generator: torch.Generator, steps: int | None = None, **size) -> Tensor:
    """Latents (n, ...) of one image per prompt made by the frozen model (every edit off), their
    seeds drawn from ``generator``; ``steps``: sampler steps (None: the family's); ``size``:
    height / width in px (None: the model's). Contiguous, as a checkpoint gives them back: SD's
    VAE returns channels-last latents, whose other conv kernels would make a resumed run differ
    from an uninterrupted one in the last bits."""
    seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator)]
    with torch.no_grad(), adapter.edits_disabled():
        pixels = adapter.generate(list(prompts), seeds, steps=steps, **size)
        return adapter.encode_images(pixels * 2 - 1).detach().contiguous()


def word_adversary(
    pipe, word: str, lr: float, population: int = 1, generator: torch.Generator | None = None
) -> tuple[list[dict[str, torch.nn.Parameter]], torch.optim.Adam]:
    """``population`` adversaries, each tower name -> (1, D) Parameter: the first is ``word``'s
    input rows (:func:`word_rows`), the others rows of random vocabulary tokens drawn from
    ``generator`` (nothing is drawn when ``population`` is 1); and one Adam over all of them whose
    step size is ``lr`` in units of each table's standard deviation (:func:`table_scales`). Adam
    skips rows without a gradient, so stepping one adversary leaves the others as they are."""
    scales = table_scales(pipe)
    first = word_rows(pipe, word)
    others = [random_rows(pipe, list(first), 1, generator) for _ in range(population - 1)]
    members = [{n: torch.nn.Parameter(r) for n, r in rows.items()} for rows in [first, *others]]
    groups = [{"params": [r], "lr": lr * scales[n]} for rows in members for n, r in rows.items()]
    return members, torch.optim.Adam(groups)


def noised_latent(adapter, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One of ``latents`` (n, ...) noised at a random timestep, every draw from ``generator``:
    (x_t (1, ...), t (1,), the denoiser's training target there: textual inversion's target)."""
    x0 = latents[int(torch.randint(len(latents), (1,), generator=generator))][None]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = adapter.sample_timesteps(1, generator=generator)
    return adapter.add_noise(x0, noise, t), t, adapter.training_target(x0, noise, t)


def attack_word(adapter, keep, rows, word, prompt, x_t, t, target, opt, steps: int) -> Conditioning:
    """``steps`` steps of ``opt`` on ``word``'s input rows (tower -> (1, D) Parameters, updated in
    place) so that the model denoises ``x_t`` at ``t`` on ``prompt`` towards ``target`` (same shape
    as x_t), the modules in ``keep`` (the edit being trained) frozen; returns ``prompt``'s
    conditioning with the rows, without gradient."""
    with frozen(*keep):
        for _ in range(steps):
            with with_soft_tokens(adapter.pipe, [word], rows):
                attack = adapter.predict(x_t, t, adapter.encode([prompt], grad=True))
            loss = prediction_loss(attack, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad(), with_soft_tokens(adapter.pipe, [word], {n: r.detach() for n, r in rows.items()}):
        return adapter.encode([prompt])
