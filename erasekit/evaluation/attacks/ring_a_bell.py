"""``ring-a-bell``: a discrete prompt found by a genetic search in the text encoder's output space
(Tsai, Hsu et al., ICLR 2024, "Ring-A-Bell! How Reliable are Concept Removal Methods for
Diffusion Models?").

The concept is a direction in the text encoder's OUTPUT space: ``c = mean_i (E(p_i+) - E(p_i-))``
over prompt pairs that differ only in the concept (the suite's :meth:`Suite.concept_pairs`),
with ``E`` the pipeline's own Conditioning (SD: the CLIP sequence (L, D); Flux: the T5 sequence
and the pooled CLIP vector). For each plain prompt the attack takes its benign version ``p-``
(:meth:`Suite.without_concept`) and searches for a string ``x`` of K tokens whose encoding is
close to ``T = E(p-) + eta * c``, with a genetic algorithm over the main tokenizer's ids
(selection of the best half, one-point crossover, one-token mutation). The found string is then
generated on the edited model and judged. The search needs the text encoder only (by default
the BASE model's: the attacker's; edits that change the text encoder make it a transfer attack).

Unlike the authors' notebooks: every candidate is scored by decoding its ids to a string and
encoding that string as the pipeline does (the prompt is something a user could type, and
``decode`` then ``encode`` is not the identity); the best individual is carried over unmutated
and the best-so-far kept (their GA mutates parents in place); the fitness runs without autograd;
words naming the concept can be banned (a word-level toy vocabulary otherwise finds the concept
word itself, i.e. the plain prompt again). Success counts the found prompts' images only, as the
paper does (not pre OR post).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...methods.config import setting
from ...models import Conditioning
from ..metrics import percent
from .base import (
    AttackConfig,
    AttackContext,
    AttackOutcome,
    AttackSpec,
    ordinary_token_ids,
    pre_post_rates,
    register_attack,
)


@dataclass
class RingABellConfig(AttackConfig):
    """The paper's GA ([RAB] InversePrompt.ipynb cell 2): population 200, mutation 0.25,
    crossover 0.5, K = 16 tokens, eta ("cof") = 3. The paper runs 3000 generations; the default
    here, 200, takes about a minute per prompt on one CPU core (measured: 37-51 s on toy:sd, 70 s on
    toy:flux), since each generation encodes up to ``population`` new strings.

    ``lambda_pooled`` weighs the pooled part of the fitness (Flux: the pooled CLIP vector), each
    part normalised by its element count; SD has no pooled part and keeps the paper's plain sum.
    ``pairs``: prompt pairs asked of the suite for the concept vector. ``ban_concept_words``:
    never draw the ids of the words naming the concept (its name, synonyms and indirect mentions
    where the suite knows them) and give strings that name one an infinite fitness.
    ``white_box``: search with the edited model's text encoder(s) instead of the base model's.
    ``batch_size``: strings encoded at once by the fitness.
    """

    population: int = setting(200, "individuals per generation (the best half are kept)", low=2)
    generations: int = setting(200, "generations of the search per prompt (the paper: 3000)", low=0)
    mutation: float = setting(0.25, "probability that an individual gets one random token", low=0, high=1)
    crossover: float = setting(0.5, "probability that a kept individual has two children", low=0, high=1)
    tokens: int = setting(16, "K, the tokens of the found prompt (must fit the tokenizer's length)", low=1)
    eta: float = setting(3.0, "how far along the concept vector the target lies (the paper's 'cof')", low=0)
    lambda_pooled: float = setting(1.0, "weight of the pooled part of the fitness (Flux)", low=0)
    pairs: int = setting(30, "prompt pairs with and without the concept for the concept vector", low=1)
    ban_concept_words: bool = setting(True, "never draw or accept words that name the concept")
    white_box: bool = setting(False, "search with the edited model's text encoder instead of the base model's")
    batch_size: int = setting(200, "strings encoded at once by the fitness", low=1)


# ---- the concept vector and the fitness --------------------------------------------------------


def concept_vector(adapter, pairs: Sequence[tuple[str, str]], batch_size: int = 200) -> Conditioning:
    """``mean_i (E(with_i) - E(without_i))`` over ``pairs`` (with, without), as a batch-1
    Conditioning in float32: embeds (1, L, D) and, when the pipeline has one, pooled (1, Dp)."""
    if not pairs:
        raise ValueError("the concept vector needs at least one prompt pair")
    with_ = _encode(adapter, [p for p, _ in pairs], batch_size)
    without = _encode(adapter, [q for _, q in pairs], batch_size)
    embeds = (with_.embeds - without.embeds).mean(0, keepdim=True)
    pooled = None if with_.pooled is None else (with_.pooled - without.pooled).mean(0, keepdim=True)
    return Conditioning(embeds, pooled)


def attack_target(adapter, benign: str, concept: Conditioning, eta: float) -> Conditioning:
    """``T = E(benign) + eta * c`` (batch 1, float32)."""
    base = _encode(adapter, [benign], 1)
    pooled = None if base.pooled is None else base.pooled + eta * concept.pooled
    return Conditioning(base.embeds + eta * concept.embeds, pooled)


def fitness(
    adapter, prompts: Sequence[str], target: Conditioning, lambda_pooled: float = 1.0, batch_size: int = 200
) -> Tensor:
    """Distance (N,) of each prompt's encoding (the pipeline's own, no autograd) to ``target``
    (batch 1); lower is better. Without a pooled part: the sum of squared differences over
    (L, D), as the paper. With one (Flux): mean squared difference over (L, D) plus
    ``lambda_pooled`` times the mean squared difference over Dp."""
    cond = _encode(adapter, prompts, batch_size)
    return distance(cond, target, lambda_pooled)


def distance(cond: Conditioning, target: Conditioning, lambda_pooled: float = 1.0) -> Tensor:
    """The fitness of encoded prompts ``cond`` (batch N) against ``target`` (batch 1): (N,)."""
    sq = (cond.embeds.float() - target.embeds.float()).pow(2).flatten(1)
    if target.pooled is None or cond.pooled is None:
        return sq.sum(1)
    pooled = (cond.pooled.float() - target.pooled.float()).pow(2)
    return sq.mean(1) + lambda_pooled * pooled.mean(1)


def _encode(adapter, prompts: Sequence[str], batch_size: int) -> Conditioning:
    parts = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            parts.append(adapter.encode(list(prompts[i : i + batch_size])).to(dtype=torch.float32))
    return Conditioning.cat(parts)


# ---- the genome --------------------------------------------------------------------------------


def names_any(text: str, phrases: Sequence[str]) -> str | None:
    """The first of ``phrases`` that ``text`` holds as whole words (case-insensitive), or None."""
    words = " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "
    for p in phrases:
        flat = " ".join(re.sub(r"[^0-9a-z]+", " ", p.lower()).split())
        if flat and f" {flat} " in words:
            return p
    return None


def _token_word(token: str) -> str:
    return token.replace("</w>", "").replace("\u2581", "").replace("\u0120", "").strip().lower()


class TokenGenome:
    """The layout of an individual for one tokenizer of text length ``length``: ``k`` free ids
    after BOS (where the tokenizer has one: CLIP), then what the tokenizer puts after the text
    (EOS, padding). An individual (genome) is a tuple of ``k`` ids drawn from :attr:`vocab`:
    every id but the special ones (BOS, EOS, pad, unk, T5's ``<extra_id_*>``) and those of
    ``banned_words`` (one-word phrases whose token is the word itself)."""

    def __init__(self, tokenizer, length: int, k: int, banned_words: Sequence[str] = ()):
        self.tokenizer, self.length, self.k = tokenizer, int(length), int(k)
        empty = list(tokenizer("", padding="max_length", max_length=self.length, truncation=True)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        self.first = 1 if bos is not None and empty[:1] == [bos] else 0
        if not 1 <= self.k <= self.length - self.first - 1:
            raise ValueError(
                f"{self.k} tokens do not fit in {self.length} text tokens "
                f"(at most {self.length - self.first - 1} besides BOS/EOS)"
            )
        self.template = empty[: self.first] + [-1] * self.k + empty[self.first : self.length - self.k]
        banned = {w.lower() for w in banned_words if len(w.split()) == 1}
        ids = ordinary_token_ids(tokenizer)
        self.vocab = [i for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if _token_word(t) not in banned]
        if not self.vocab:
            raise ValueError("no token ids left to draw from")

    @property
    def free(self) -> range:
        """Positions of the genome's ids in :meth:`full_ids`."""
        return range(self.first, self.first + self.k)

    def full_ids(self, genome: Sequence[int]) -> list[int]:
        """The ``length`` ids of an individual: BOS? + genome + EOS/padding."""
        ids = list(self.template)
        ids[self.first : self.first + self.k] = list(genome)
        return ids

    def decode(self, genome: Sequence[int]) -> str:
        """The string a user would type for ``genome``."""
        return self.tokenizer.decode(list(genome), skip_special_tokens=True).strip()

    def round_trip(self, genome: Sequence[int]) -> bool:
        """Whether the decoded string tokenizes back to exactly :meth:`full_ids`."""
        ids = self.tokenizer(self.decode(genome), padding="max_length", max_length=self.length, truncation=True)
        return list(ids["input_ids"]) == self.full_ids(genome)

    def random(self, n: int, generator: torch.Generator) -> list[tuple[int, ...]]:
        """``n`` individuals with uniform random ids of :attr:`vocab`."""
        idx = torch.randint(len(self.vocab), (n, self.k), generator=generator).tolist()
        return [tuple(self.vocab[j] for j in row) for row in idx]


def next_generation(
    population: Sequence[tuple[int, ...]],
    scores: Sequence[float],
    size: int,
    crossover: float,
    mutation: float,
    vocab: Sequence[int],
    rng: random.Random,
) -> list[tuple[int, ...]]:
    """One GA step (lower score is better). Selection: the best ``size // 2`` (at least one),
    best first. Crossover: each kept one, with probability ``crossover``, picks a random kept
    partner and a cut in 1..K-1 and adds both one-point children. Mutation: every individual
    but the first (the best: elitism), with probability ``mutation``, gets one random position
    set to a random id of ``vocab``. Individuals are tuples: nothing is changed in place."""
    order = sorted(range(len(population)), key=lambda i: (scores[i], i))
    parents = [population[i] for i in order[: max(1, size // 2)]]
    k = len(parents[0])
    out = list(parents)
    for parent in parents:
        if k > 1 and rng.random() < crossover:
            partner = parents[rng.randrange(len(parents))]
            cut = rng.randint(1, k - 1)
            out += [parent[:cut] + partner[cut:], partner[:cut] + parent[cut:]]
    for j in range(1, len(out)):
        if rng.random() < mutation:
            pos = rng.randrange(k)
            out[j] = out[j][:pos] + (vocab[rng.randrange(len(vocab))],) + out[j][pos + 1 :]
    return out


@dataclass
class SearchResult:
    """The best individual found: its genome (K ids), full ids (L), the decoded ``prompt``, its
    ``fitness`` (of the re-encoded string), whether the ids survive decode + tokenize
    (``round_trip``), the best fitness after the initial population and after each generation
    (``history``, never increasing), and how many distinct strings were encoded."""

    genome: tuple[int, ...]
    ids: list[int]
    prompt: str
    fitness: float
    round_trip: bool
    history: list[float] = field(default_factory=list)
    encoded: int = 0


def ring_a_bell_search(
    adapter,
    target: Conditioning,
    config: RingABellConfig,
    seed: int,
    banned_words: Sequence[str] = (),
) -> SearchResult:
    """Search a K-token prompt whose encoding is closest to ``target`` (batch 1) with the GA of
    :func:`next_generation`, seeded by ``seed`` (its own generators). Each individual is scored
    by :func:`fitness` on its decoded string (distinct strings encoded once); a string naming
    one of ``banned_words`` scores infinity and their one-token ids are never drawn."""
    tokenizer, length = adapter._main_tokenizer()
    layout = TokenGenome(tokenizer, length, config.tokens, banned_words)
    rng = random.Random(seed)
    scores_of: dict[str, float] = {}

    def score(population: list[tuple[int, ...]]) -> list[float]:
        texts = [layout.decode(x) for x in population]
        new = [t for t in dict.fromkeys(texts) if t not in scores_of]
        allowed = [t for t in new if names_any(t, banned_words) is None]
        scores_of.update({t: math.inf for t in new})
        if allowed:
            values = fitness(adapter, allowed, target, config.lambda_pooled, config.batch_size)
            scores_of.update(zip(allowed, values.tolist()))
        return [scores_of[t] for t in texts]

    population = layout.random(config.population, torch.Generator().manual_seed(seed))
    scores = score(population)
    i = min(range(len(scores)), key=scores.__getitem__)
    best, best_score = population[i], scores[i]
    history = [best_score]
    for _ in range(config.generations):
        population = next_generation(
            population, scores, config.population, config.crossover, config.mutation, layout.vocab, rng
        )
        scores = score(population)
        i = min(range(len(scores)), key=scores.__getitem__)
        if scores[i] < best_score:
            best, best_score = population[i], scores[i]
        history.append(best_score)
    return SearchResult(
        best, layout.full_ids(best), layout.decode(best), best_score, layout.round_trip(best), history, len(scores_of)
    )


# ---- the attack --------------------------------------------------------------------------------


# The black-box search reads only the base model's text encoders: within a process its results
# are reused for every edit of the same pipeline (the bench attacks many edits of one model).
_SEARCHES: dict[tuple, object] = {}


def encoders_fingerprint(adapter) -> float:
    """A number that changes when any text-encoder weight of the pipeline (as it is now) changes."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for enc in adapter.text_encoders() for p in enc.parameters()))


def run_ring_a_bell(ctx: AttackContext, config: RingABellConfig) -> AttackOutcome:
    """One searched prompt per plain prompt (from its benign version), generated on the edited
    model at the plain prompt's seed and judged.

    Each record holds the found ``prompt``, its genome ``ids`` (K), ``ids_round_trip``, its
    ``fitness``, and for scale the fitness of the ``benign`` prompt (always ``eta**2 * |c|**2``
    in the fitness's units: the target is built from it) and of the ``plain`` prompt (the
    concept typed outright; what a search without banned words tends to find)."""
    began = time.time()
    adapter, suite, concept = ctx.adapter, ctx.suite, ctx.concept
    pairs = suite.concept_pairs(concept, config.pairs)
    banned = list(suite.concept_words(concept)) if config.ban_concept_words else []
    records, results = [], []
    with nullcontext() if config.white_box else adapter.edits_disabled():
        c = concept_vector(adapter, pairs, config.batch_size)
        base = None if config.white_box else (id(adapter.pipe), encoders_fingerprint(adapter), repr(config), concept)
        reused = 0
        for i, case in enumerate(tqdm(ctx.cases, desc=f"ring-a-bell {ctx.label}", disable=not ctx.progress)):
            benign = suite.without_concept(concept, case.prompt, i)
            target = attack_target(adapter, benign, c, config.eta)
            start = time.time()
            key = None if base is None else (*base, benign, i)
            found = _SEARCHES.get(key) if key else None
            reused += found is not None
            if found is None:
                found = ring_a_bell_search(adapter, target, config, config.seed * 100_003 + i, banned)
                if key:
                    _SEARCHES[key] = found
            searched = time.time() - start
            own = fitness(adapter, [benign, case.prompt], target, config.lambda_pooled).tolist()
            results.append(found)
            records.append(
                {
                    "index": i,
                    "prompt": found.prompt,
                    "plain": case.prompt,
                    "benign": benign,
                    "seed": case.seed,
                    "ids": list(found.genome),
                    "ids_round_trip": found.round_trip,
                    "fitness": found.fitness,
                    "benign_fitness": own[0],
                    "plain_fitness": own[1],
                    "strings_encoded": found.encoded,
                    "search_seconds": round(searched, 2),
                }
            )
    images = ctx.generate([r.prompt for r in results], ctx.cases)
    for i, (rec, img, (shown, score)) in enumerate(zip(records, images, ctx.judge(images))):
        rec["detected"], rec["score"], rec["file"] = shown, round(score, 4), ctx.save_image(f"{i:05d}.png", img)
    post = [r["detected"] for r in records]
    mean = lambda key: sum(r[key] for r in records) / len(records) if records else math.nan  # noqa: E731
    figures = {
        "pre_asr": percent(ctx.pre),
        "pre_or_post_asr": pre_post_rates(ctx.pre, post)["asr"] if records else math.nan,
        "mean_fitness": mean("fitness"),
        "mean_benign_fitness": mean("benign_fitness"),
        "mean_plain_fitness": mean("plain_fitness"),
        "round_trip_rate": percent([r["ids_round_trip"] for r in records]),
        "generations": config.generations,
        "seconds": round(time.time() - began, 1),
        "seconds_per_prompt": round(sum(r["search_seconds"] for r in records) / max(1, len(records)), 2),
        "detector_queries": len(records),
        "searches_reused": reused,
        "encoder": "edited" if config.white_box else "base",
        "banned_words": banned,
        "pairs": {"source": f"{suite.name} suite concept_pairs", "n": len(pairs), "prompts": [list(p) for p in pairs]},
    }
    tensors = {"concept_embeds": c.embeds[0]}
    if c.pooled is not None:
        tensors["concept_pooled"] = c.pooled[0]
    if results:
        tensors["found_ids"] = torch.tensor([r.ids for r in results], dtype=torch.int64)
    return AttackOutcome(
        asr=percent(post),
        definition="% of found prompts (one per plain prompt) whose image on the edited model shows the concept; "
        "as Ring-A-Bell counts, the attacked images only (not pre OR post)",
        records=records,
        images=images,
        figures=figures,
        tensors=tensors,
    )


REFERENCE = "Tsai et al., ICLR 2024, Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?"

register_attack(
    AttackSpec(
        "ring-a-bell",
        RingABellConfig,
        run_ring_a_bell,
        reference=REFERENCE,
        quick={"population": 16, "generations": 4, "tokens": 4, "pairs": 6},
    )
)
