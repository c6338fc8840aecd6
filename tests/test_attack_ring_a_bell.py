"""The ring-a-bell attack: concept vector, fitness, the genetic search's invariants, the suites'
prompt pairs, and the attack end to end on both families."""

import json
import random
from dataclasses import asdict

import pytest
import torch
from attack_helpers import attack_uce_circle
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.evaluation.attacks import attack, make_attack_config
from erasekit.evaluation.attacks.ring_a_bell import (
    RingABellConfig,
    TokenGenome,
    attack_target,
    concept_vector,
    fitness,
    names_any,
    next_generation,
    ring_a_bell_search,
)
from erasekit.evaluation.suites import Case, Suite, replace_phrase
from erasekit.methods import uce
from erasekit.methods.uce import UCEConfig
from erasekit.toyworld.grammar import OBJECT_NAMES
from erasekit.toyworld.suite import ToyObjectSuite

PAIRS = [("a red circle", "a red square"), ("a photo of a circle", "a photo of a car"), ("circle", "dog")]
SMALL_GA = dict(population=12, generations=6, tokens=3)


def _ids(adapter, prompt: str) -> tuple[int, ...]:
    tokenizer, _ = adapter.main_text_encoder()
    return tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_the_concept_vector_is_the_mean_of_pair_differences(family_adapter):
    adapter = family_adapter
    c = concept_vector(adapter, PAIRS)
    pos, neg = adapter.encode([p for p, _ in PAIRS]), adapter.encode([q for _, q in PAIRS])
    assert c.embeds.shape == (1,) + tuple(pos.embeds.shape[1:])
    assert torch.allclose(c.embeds[0], (pos.embeds - neg.embeds).float().mean(0), atol=1e-5)
    if pos.pooled is None:
        assert c.pooled is None
    else:
        assert torch.allclose(c.pooled[0], (pos.pooled - neg.pooled).float().mean(0), atol=1e-5)
    again = concept_vector(adapter, PAIRS * 5, batch_size=4)  # replication only reweights: equal weights
    assert torch.allclose(again.embeds, c.embeds, atol=1e-5)


def test_the_benign_prompt_has_zero_fitness_at_eta_zero_and_batching_changes_nothing(family_adapter):
    adapter = family_adapter
    c = concept_vector(adapter, PAIRS)
    target = attack_target(adapter, "a red car", c, eta=0.0)
    prompts = ["a red car", "a dog in a park", "tree sky", "a red car"]
    batched = fitness(adapter, prompts, target, batch_size=3)
    single = torch.cat([fitness(adapter, [p], target) for p in prompts])
    assert torch.allclose(batched, single, rtol=1e-5, atol=1e-5)
    assert batched[0] == pytest.approx(0.0, abs=1e-6) and batched[3] == pytest.approx(0.0, abs=1e-6)
    assert (batched[1:3] > 0).all()
    # The benign prompt's own ids, decoded and re-encoded, are the same string.
    tokenizer, length = adapter._main_tokenizer()
    layout = TokenGenome(tokenizer, length, 3)
    genome = _ids(adapter, "a red car")
    assert layout.decode(genome) == "a red car" and layout.round_trip(genome)
    assert fitness(adapter, [layout.decode(genome)], target).item() == pytest.approx(0.0, abs=1e-6)
    # Moving along the concept vector moves the target away from the benign prompt.
    assert fitness(adapter, ["a red car"], attack_target(adapter, "a red car", c, eta=3.0)).item() > 0


def test_the_genome_keeps_special_positions_and_draws_no_special_ids(family_adapter):
    adapter = family_adapter
    tokenizer, length = adapter._main_tokenizer()
    k = 5
    layout = TokenGenome(tokenizer, length, k, banned_words=["circle", "round shape"])
    special = set(tokenizer.all_special_ids)
    assert not special & set(layout.vocab)
    assert _ids(adapter, "circle")[0] not in layout.vocab and _ids(adapter, "square")[0] in layout.vocab
    genomes = layout.random(20, torch.Generator().manual_seed(0))
    bos = getattr(tokenizer, "bos_token_id", None)
    for g in genomes:
        ids = layout.full_ids(g)
        assert len(ids) == length and tuple(ids[layout.first : layout.first + k]) == g
        if layout.first:  # CLIP: BOS first
            assert ids[0] == bos
        assert ids[layout.first + k] == tokenizer.eos_token_id  # then EOS (CLIP), </s> (T5)
        assert ids[layout.first + k :] == layout.template[layout.first + k :]
    with pytest.raises(ValueError, match="do not fit"):
        TokenGenome(tokenizer, length, length)


def test_a_generation_keeps_the_best_half_and_never_changes_the_best():
    rng = random.Random(0)
    population = [tuple(rng.randrange(100) for _ in range(4)) for _ in range(10)]
    scores = [float(rng.random()) for _ in population]
    frozen = list(population)
    best = sorted(range(10), key=scores.__getitem__)
    out = next_generation(population, scores, 10, crossover=0.0, mutation=0.0, vocab=range(100), rng=rng)
    assert out == [population[i] for i in best[:5]] and population == frozen
    for _ in range(5):
        out = next_generation(population, scores, 10, crossover=1.0, mutation=1.0, vocab=range(100), rng=rng)
        assert out[0] == population[best[0]] and population == frozen  # the elite, untouched; no in-place change
        assert len(out) == 5 + 2 * 5 and all(len(x) == 4 for x in out)
    out = next_generation(population, scores, 10, crossover=0.0, mutation=1.0, vocab=[777], rng=rng)
    for kept, parent in zip(out[1:], [population[i] for i in best[1:5]]):
        assert sum(a != b for a, b in zip(kept, parent)) == 1 and kept.count(777) == 1


def test_the_search_never_worsens_and_is_reproducible(family_adapter):
    adapter = family_adapter
    c = concept_vector(adapter, PAIRS)
    target = attack_target(adapter, "a red square", c, eta=3.0)
    config = RingABellConfig(**SMALL_GA)
    found = ring_a_bell_search(adapter, target, config, seed=1, banned_words=["circle"])
    assert len(found.history) == config.generations + 1
    assert all(b <= a for a, b in zip(found.history, found.history[1:]))
    assert found.fitness == found.history[-1] and names_any(found.prompt, ["circle"]) is None
    assert found.fitness == pytest.approx(fitness(adapter, [found.prompt], target).item(), rel=1e-5)
    again = ring_a_bell_search(adapter, target, config, seed=1, banned_words=["circle"])
    assert (again.prompt, again.genome, again.history) == (found.prompt, found.genome, found.history)
    other = ring_a_bell_search(adapter, target, config, seed=2, banned_words=["circle"])
    assert other.genome != found.genome


def test_at_eta_zero_the_search_finds_the_prompt_itself(sd):
    target = attack_target(sd, "red car", concept_vector(sd, PAIRS), eta=0.0)
    config = RingABellConfig(population=100, generations=60, tokens=2, mutation=0.5)
    found = ring_a_bell_search(sd, target, config, seed=0)
    assert found.fitness < 1e-6 and found.prompt == "red car" and found.round_trip


def test_banned_words_are_found_as_whole_words_only():
    assert names_any("A Circle, red", ["circle"]) == "circle"
    assert names_any("semicircle", ["circle"]) is None
    assert names_any("a round  shape!", ["disc", "round shape"]) == "round shape"


def test_suites_give_prompt_pairs_that_differ_only_in_the_concept():
    suite = ToyObjectSuite(n=4, n_locality=1)
    pairs = suite.concept_pairs("circle", 12)
    assert len(pairs) == 12 and len(set(pairs)) == 12
    for i, (with_, without) in enumerate(pairs):
        other = [o for o in OBJECT_NAMES if o != "circle"][i % 5]
        assert "circle" in with_ and "circle" not in without and other in without
        assert replace_phrase(with_, "circle", other) == without
    assert suite.concept_pairs("circle", 12) == pairs  # fixed by the concept
    assert suite.without_concept("circle", "here is an orb and a round shape", 1) == (
        "here is a triangle and a triangle"
    )
    assert "disc" in suite.concept_words("circle") and "coin" in suite.concept_words("circle")

    class Plain(Suite):
        name = "plain"

        def attack_sets(self, concept):
            return {"plain": [Case("An image of an apple", 0), Case("An image of an apple", 1), Case("a tree", 2)]}

    assert Plain().concept_pairs("apple", 5) == [("An image of an apple", "An image of an object")]
    assert Plain().without_concept("apple", "a tree") == "a tree"


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_ring_a_bell_attack_end_to_end(family, tmp_path):
    pipe = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}[family](seed=0)
    results = attack_uce_circle(pipe, tmp_path, ["ring-a-bell"], quick=True)
    assert set(results["asr"]["uce"]) == {"no attack", "ring-a-bell"}
    assert 0 <= results["asr"]["uce"]["ring-a-bell"] <= 100
    assert results["configs"]["ring-a-bell"] == asdict(make_attack_config("ring-a-bell", quick=True))
    out = results["attack_results"]["ring-a-bell"]["uce"]
    assert "attacked images only" in out["definition"]
    assert out["figures"]["pairs"]["n"] == 6 and out["figures"]["pairs"]["source"].startswith("toy-objects")
    assert out["figures"]["encoder"] == "base" and "circle" in out["figures"]["banned_words"]
    assert len(out["cases"]) == 2
    for rec in out["cases"]:
        assert names_any(rec["prompt"], ["circle"]) is None and rec["plain"] == "an image of a circle"
        assert 0 < rec["fitness"] < float("inf") and rec["benign_fitness"] > 0
        assert len(rec["ids"]) == 4 and isinstance(rec["ids_round_trip"], bool)
        assert (tmp_path / rec["file"]).is_file()
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ring-a-bell" / "uce" / "ring-a-bell.safetensors"))
    assert tensors["concept_embeds"].shape == (32, 32) and tensors["found_ids"].shape == (2, 32)
    assert ("concept_pooled" in tensors) == (family == "flux")
    assert json.loads((tmp_path / "results.json").read_text())["references"]["ring-a-bell"].startswith("Tsai")


def test_black_box_searches_are_reused_across_edits(sd_pipe, tmp_path):

    edit = uce.fit(sd_pipe, "circle", UCEConfig(), progress=False)
    kwargs = dict(attacks=["ring-a-bell"], n=2, quick=True, progress=False, batch_size=4)
    first = attack(sd_pipe, "toy-objects", "circle", edits=[edit], out=tmp_path / "a", **kwargs)
    again = attack(sd_pipe, "toy-objects", "circle", edits=[edit], out=tmp_path / "b", **kwargs)
    one, two = (r["attack_results"]["ring-a-bell"]["uce"] for r in (first, again))
    assert two["figures"]["searches_reused"] == 2
    assert [c["prompt"] for c in one["cases"]] == [c["prompt"] for c in two["cases"]]
