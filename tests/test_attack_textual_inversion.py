"""The textual-inversion attack: only the new token's rows learn, plain prompts stay bit-identical,
the same seed gives the same rows, and the attack runs end to end on both families."""

import pytest
import torch
from attack_helpers import attack_uce_circle
from safetensors.torch import load_file

from erasekit.errors import UserError
from erasekit.evaluation.attacks import attack, make_attack_config
from erasekit.evaluation.attacks.textual_inversion import TOKEN, TextualInversionConfig, invert, with_word
from erasekit.models.token_rows import single_token_id, text_towers, token_rows
from erasekit.toyworld.suite import ToyObjectSuite

WORD = "picture"  # one token in the tiny pipelines' vocabulary


def _tables(pipe):
    return {name: enc.get_input_embeddings().weight.detach().clone() for name, _, enc in text_towers(pipe)}


def test_token_rows_change_only_the_placeholder(family_adapter):
    adapter = family_adapter
    pipe = adapter.pipe
    plain = adapter.encode(["a red car", ""])
    with_word_plain = adapter.encode([f"a {WORD} of a car"])
    rows = {name: torch.randn(enc.get_input_embeddings().weight.shape[1]) for name, _, enc in text_towers(pipe)}
    with token_rows(pipe, WORD, rows) as ids:
        inside = adapter.encode(["a red car", ""])
        changed = adapter.encode([f"a {WORD} of a car"])
    assert set(ids) == {name for name, _, _ in text_towers(pipe)}
    assert torch.equal(inside.embeds, plain.embeds)  # bit-identical without the placeholder
    if plain.pooled is not None:
        assert torch.equal(inside.pooled, plain.pooled)
    assert not torch.allclose(changed.embeds, with_word_plain.embeds)
    # the table's own row as the override gives the plain encoding back
    same = {name: enc.get_input_embeddings().weight[ids[name]].detach() for name, _, enc in text_towers(pipe)}
    with token_rows(pipe, WORD, same):
        again = adapter.encode([f"a {WORD} of a car"])
    assert torch.allclose(again.embeds, with_word_plain.embeds, atol=1e-6)
    # and the hooks are gone afterwards
    assert torch.equal(adapter.encode([f"a {WORD} of a car"]).embeds, with_word_plain.embeds)


def test_a_word_of_several_tokens_is_refused(sd):
    with pytest.raises(UserError, match="not one token"):
        single_token_id(sd.pipe.tokenizer, "zebrafish")


def test_inversion_trains_only_the_rows_and_repeats_with_the_seed(family_adapter):
    adapter = family_adapter
    pipe = adapter.pipe
    before = _tables(pipe)
    params = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    for p in (p for m in modules for p in m.parameters()):
        p.grad = None  # other tests share the pipeline
    images = [torch.rand(3, 32, 32) for _ in range(3)]
    config = TextualInversionConfig(steps=3, batch_size=2, images=3, word=WORD, seed=5)
    rows, losses = invert(adapter, images, WORD, config)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name, table in _tables(pipe).items():
        assert torch.equal(table, before[name])  # the tables never change
        token = single_token_id(dict((n, t) for n, t, _ in text_towers(pipe))[name], WORD)
        assert not torch.equal(rows[name], before[name][token].float())  # the row learned
    assert all(torch.equal(p, params[n]) for n, p in pipe.text_encoder.named_parameters())
    assert all(
        p.grad is None for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()
    )
    again, losses2 = invert(adapter, images, WORD, config)
    assert losses2 == losses and all(torch.equal(again[n], rows[n]) for n in rows)


def test_with_word_replaces_the_concept_and_fixes_the_article():
    assert with_word("an image of a circle", ["circle"], "orb") == "an image of an orb"
    assert with_word("An image of an orb", ["orb"], "mark") == "An image of a mark"
    assert with_word("a red Circle, big circle", ["circle"], "mark") == "a red mark, big mark"
    assert with_word("a round shape", ["round shape", "round"], "mark") == "a mark"
    assert with_word("a circled word", ["circle"], "mark") == "mark a circled word"


def test_toy_suite_renders_the_concept_and_picks_a_neutral_word():
    suite = ToyObjectSuite()
    images = suite.concept_images("heart", 4, seed=1)
    assert len(images) == 4 and images[0].shape == (3, 32, 32) and 0 <= float(images[0].min()) <= 1
    assert all(torch.equal(a, b) for a, b in zip(images, suite.concept_images("heart", 4, seed=1)))
    assert suite.inversion_word("circle") == "mark" and suite.inversion_word("cross") == "symbol"


def test_config_checks_templates():
    with pytest.raises(Exception, match="templates"):
        make_attack_config("textual-inversion", {"templates": "an image of a thing"})


@pytest.mark.parametrize("family", ["sd_pipe", "flux_pipe"])
def test_attack_end_to_end(family, request, tmp_path):
    pipe = request.getfixturevalue(family)
    settings = {"word": WORD, "steps": "2", "images": "3", "source": "renderer"}
    results = attack_uce_circle(
        pipe, tmp_path, ["textual-inversion"], configs={"textual-inversion": settings}, include_base=True
    )
    res = results["attack_results"]["textual-inversion"]
    assert set(res) == {"base", "uce"}
    assert set(results["asr"]["uce"]) == {"no attack", "textual-inversion"}
    assert len(res["uce"]["cases"]) == 2 and "<token>" in res["uce"]["cases"][0]["prompt"]
    assert 0 <= res["uce"]["figures"]["init_asr"] <= 100 and res["uce"]["figures"]["training_images"] == 3
    rows = load_file(str(tmp_path / "textual-inversion" / "uce" / "textual-inversion.safetensors"))
    assert set(rows) == {f"{name}.{TOKEN}" for name, _, _ in text_towers(pipe)}
    assert (tmp_path / "report.html").read_text().count("textual-inversion on") == 2


def test_learned_rows_load_in_stock_diffusers(sd_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    from erasekit.evaluation.attacks.textual_inversion import save_learned_embeds
    from erasekit.models import adapter_for

    row = torch.randn(sd_pipe.text_encoder.get_input_embeddings().weight.shape[1])
    assert save_learned_embeds(tmp_path, {"text_encoder": row}) == ["learned_embeds.safetensors"]
    with token_rows(sd_pipe, WORD, {"text_encoder": row}):
        ours = adapter_for(sd_pipe).encode([f"a {WORD} of a car"]).embeds
    stock = StableDiffusionPipeline(**sd_pipe.components)
    stock.tokenizer = type(sd_pipe.tokenizer).from_pretrained(_save_tokenizer(sd_pipe.tokenizer, tmp_path))
    stock.text_encoder = type(sd_pipe.text_encoder)(sd_pipe.text_encoder.config)
    stock.text_encoder.load_state_dict(sd_pipe.text_encoder.state_dict())
    stock.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token=TOKEN)
    theirs, _ = stock.encode_prompt([f"a {TOKEN} of a car"], "cpu", 1, False)
    assert torch.allclose(theirs, ours, atol=1e-5)


def _save_tokenizer(tokenizer, tmp_path):
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_reference_model_gives_the_targets_and_training_images(sd_pipe, tmp_path, monkeypatch):
    """An oracle (a model that never learned the concept) is attacked with the shipped model's
    images: the reference run's images are the attacks' base images, extra training images too."""
    from tiny_pipelines import tiny_sd_pipeline

    from erasekit.evaluation.attacks import textual_inversion as ti
    from erasekit.evaluation.attacks.base import AttackContext
    from erasekit.models import adapter_for

    reference = tiny_sd_pipeline(seed=1)
    seen = {}
    real = ti.invert

    def spy(adapter, images, word, config, progress=False):
        seen["images"] = images
        return real(adapter, images, word, config, progress)

    monkeypatch.setattr(ti, "invert", spy)
    results = attack(
        sd_pipe,
        "toy-objects",
        "circle",
        out=tmp_path,
        attacks=["textual-inversion"],
        n=2,
        configs={"textual-inversion": {"word": WORD, "steps": "1", "images": "3"}},
        include_base=True,
        reference=reference,
        progress=False,
    )
    assert results["reference"]["class"] == "StableDiffusionPipeline"
    assert (tmp_path / "reference" / "base").is_dir()
    first = ToyObjectSuite().attack_sets("circle")["plain"][0]

    def image_of(pipe):
        ctx = AttackContext(pipe, adapter_for(pipe), "circle", None, None, "", [], [], [], tmp_path)
        return ctx.generate([first.prompt], [first])[0]

    assert len(seen["images"]) == 3
    assert torch.equal(seen["images"][0], image_of(reference))  # the reference's image, not the attacked one's
    assert not torch.equal(seen["images"][0], image_of(sd_pipe))
