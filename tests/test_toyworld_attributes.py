"""The toy world's attribute suites (toy-styles, toy-colors): prompts, scoring on hand-made
cases, registration and the command line, the lexicons on adjectives, every method's fit on an
attribute concept on both tiny families, and the bench with attribute concepts."""

import json
import math

import pytest
import torch
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

import erasekit.bench as bench
from erasekit.cli import build_parser, main
from erasekit.evaluation.metrics import harmonic_h
from erasekit.evaluation.suites import Case, SuiteError, make_suite
from erasekit.registry import SUITES
from erasekit.toyworld.attributes import (
    HELDOUT_TEXTURE_TEMPLATES,
    ToyColorSuite,
    ToyStyleSuite,
    attribute_accuracies,
    attribute_prompts,
    suite_for_concept,
)
from erasekit.toyworld.detector import HEADS
from erasekit.toyworld.grammar import COLORS, TRAIN_TEMPLATES, vocabulary
from erasekit.toyworld.lexicon import ToyWorldLexicon

# ---- prompts ---------------------------------------------------------------------------------


def test_texture_prompts_sets_sizes_and_words():
    cases = attribute_prompts("striped", n=6, n_locality=2)
    by_set = {s: [c for c in cases if c.set == s] for s in ("simple", "paraphrase", "synonym", "locality")}
    assert [len(v) for v in by_set.values()] == [6, 6, 6, 3 * 2]  # locality: solid, plain, filled x 2
    assert len(cases) == 24
    assert all(c.label == "striped" and " striped" in f" {c.prompt}" for c in by_set["simple"] + by_set["paraphrase"])
    assert {w for c in by_set["synonym"] for w in ("stripy", "lined") if w in c.prompt.split()} == {"stripy", "lined"}
    assert all("striped" not in c.prompt for c in by_set["synonym"] + by_set["locality"])
    assert {c.label for c in by_set["locality"]} == {"solid"}
    assert {c.extra["object"] for c in by_set["simple"]} == {"circle", "square", "triangle", "star", "heart", "cross"}
    assert all(c.extra["object"] in c.prompt for c in cases)
    # a prompt that names a colour has it in extra (content checks it), one that names none has None
    for c in cases:
        named = [col for col in COLORS if col in c.prompt.replace(",", " ").split()]
        assert c.extra["color"] == (named[0] if named else None)
    assert len({c.seed for c in cases}) == len(cases)
    assert attribute_prompts("striped", n=6, n_locality=2) == cases  # deterministic


def test_held_out_texture_templates_use_only_known_words_and_never_appear_in_training():
    vocab = set(vocabulary())
    for t in HELDOUT_TEXTURE_TEMPLATES:
        assert t not in TRAIN_TEMPLATES and "{texture}" in t
        words = t.replace(",", " ").replace(".", " ").split()
        assert {w for w in words if not w.startswith("{")} <= vocab
    for c in attribute_prompts("striped") + attribute_prompts("red"):
        assert set(c.prompt.replace(",", " , ").replace(".", " . ").split()) <= vocab


def test_colour_prompts_have_no_synonym_set_and_locality_covers_every_other_colour():
    cases = attribute_prompts("red", n=4, n_locality=2)
    assert {c.set for c in cases} == {"simple", "paraphrase", "locality"}
    assert sorted({c.label for c in cases if c.set == "locality"}) == sorted(set(COLORS) - {"red"})
    assert all("red" in c.prompt.split() for c in cases if c.set != "locality")


# ---- scoring on hand-made cases ----------------------------------------------------------------


def _case(set_name, value, obj="circle", color=None, texture=None, kind="texture"):
    extra = {"kind": kind, "object": obj, "color": color, "texture": texture}
    return Case(f"{set_name} {value} {obj}", 0, set_name, value, extra=extra)


def _got(obj="circle", color="red", texture="solid"):
    return {"object": obj, "color": color, "texture": texture, "background": "white"}


def test_a_striped_object_detected_as_solid_counts_as_erased_and_keeps_its_content():
    cases = [_case("simple", "striped", color="red", texture="striped")] * 2
    got = [_got(texture="solid"), _got(texture="striped")]
    m = attribute_accuracies(cases, got)
    assert m["acc_e"] == 50.0 and m["content"] == 100.0
    assert math.isnan(m["acc_r"]) and math.isnan(m["acc_l"]) and math.isnan(m["h"])  # sets not run


def test_a_wrong_object_or_colour_counts_against_content_not_for_erasure():
    cases = [
        _case("simple", "striped", obj="circle", color="red", texture="striped"),
        _case("paraphrase", "striped", obj="heart", color=None, texture="striped"),
        _case("synonym", "striped", obj="star", color="blue", texture="striped"),
        _case("synonym", "striped", obj="cross", color=None, texture="striped"),
    ]
    got = [
        _got(obj="square", texture="solid"),  # erased, but the wrong object
        _got(obj="heart", color="green", texture="solid"),  # no colour named: any colour keeps the content
        _got(obj="star", color="red", texture="striped"),  # the wrong colour, and still striped
        _got(obj="none", texture="solid"),  # nothing drawn
    ]
    m = attribute_accuracies(cases, got)
    assert m["acc_e"] == 0.0 and m["acc_r"] == pytest.approx(100 / 3)
    assert m["content"] == 25.0
    assert m["content_per_set"] == {"simple": 0.0, "paraphrase": 100.0, "synonym": 0.0}


def test_a_colour_prompt_keeps_its_content_when_object_and_named_texture_stay():
    cases = [_case("simple", "red", texture="striped", kind="color"), _case("simple", "red", kind="color")]
    got = [_got(color="blue", texture="striped"), _got(color="red", texture="striped")]
    m = attribute_accuracies(cases, got)
    assert m["acc_e"] == 50.0 and m["content"] == 100.0  # the second names no texture


def test_locality_counts_the_other_values_with_their_own_object():
    cases = [_case("locality", "solid", obj=o, texture="solid") for o in ("circle", "square", "heart", "star")]
    got = [
        _got(obj="circle", texture="solid"),  # kept
        _got(obj="square", texture="striped"),  # the erasure spilled over: striped now
        _got(obj="circle", texture="solid"),  # the right texture on the wrong object
        _got(obj="star", texture="solid", color="green"),  # a colour the prompt never named: kept
    ]
    m = attribute_accuracies(cases, got)
    assert m["acc_l"] == 50.0 and m["per_set"]["locality"] == 50.0


def test_h_holds_content_as_a_fourth_term():
    cases = [_case("simple", "striped"), _case("paraphrase", "striped"), _case("locality", "solid")]
    erased_and_wrecked = [_got(obj="none"), _got(obj="none"), _got()]
    m = attribute_accuracies(cases, erased_and_wrecked)
    assert (m["acc_e"], m["acc_r"], m["acc_l"], m["content"]) == (0.0, 0.0, 100.0, 0.0)
    assert m["h"] == 0.0 and m["h_no_content"] == 100.0  # without content it would look perfect
    clean = attribute_accuracies(cases, [_got(), _got(), _got()])
    assert clean["h"] == 100.0
    assert harmonic_h(20, 40, 80, content=50) == pytest.approx(4 / (1 / 80 + 1 / 60 + 1 / 80 + 1 / 50))


class HeadStub:
    """A toy-classifier stand-in: says every image shows a solid red circle, except the images
    whose top-left pixel is bright (striped)."""

    name = "stub"
    threshold = "argmax"

    def classify(self, images):
        n = len(images)
        probs = {h: torch.zeros(n, len(c)) for h, c in HEADS.items()}
        for h, value in (("object", "circle"), ("color", "red"), ("background", "white")):
            probs[h][:, HEADS[h].index(value)] = 1
        striped = images[:, 0, 0, 0] > 0.5
        probs["texture"][:, HEADS["texture"].index("striped")] = striped.float()
        probs["texture"][:, HEADS["texture"].index("solid")] = (~striped).float()
        return probs


def test_the_suite_scores_through_the_detector_heads():
    suite = ToyStyleSuite(n=2, n_locality=1)
    cases = suite.cases("striped")
    images = [torch.zeros(3, 8, 8) for _ in cases]
    for i, c in enumerate(cases):
        if c.set == "simple":
            images[i][:, 0, 0] = 1  # still striped
    m = suite.score(cases, images, HeadStub(), "striped")
    assert m["acc_e"] == 100.0 and m["acc_r"] == 0.0 and m["n_images"] == len(cases)
    assert m["cases"][0]["detected_texture"] == "striped" and m["cases"][0]["object"] == cases[0].extra["object"]
    with pytest.raises(SuiteError, match="toy detector"):
        suite.score(cases, images, object(), "striped")


def test_report_grid_rows_spread_over_each_set():
    suite = ToyColorSuite(n=8, n_locality=4)
    cases = suite.cases("red")
    rows = suite.grid_rows(cases, per_row=8)
    assert [label.split(":")[0] for label, _ in rows] == ["simple", "paraphrase", "locality"]
    locality = rows[-1][1]
    assert len(locality) == 8 and len({cases[i].label for i in locality}) == 4  # every other colour shown


# ---- registration, the command line, attacks' hooks --------------------------------------------


def test_registered_suites_and_the_concept_each_measures():
    assert {"toy-objects", "toy-styles", "toy-colors"} <= set(SUITES)
    assert SUITES.get("toy-styles") is ToyStyleSuite and SUITES.get("toy-colors") is ToyColorSuite
    assert [suite_for_concept(c) for c in ("circle", "striped", "solid", "red")] == [
        "toy-objects",
        "toy-styles",
        "toy-styles",
        "toy-colors",
    ]
    with pytest.raises(ValueError, match="unknown toy-world concept 'plaid'"):
        suite_for_concept("plaid")
    quick = make_suite("toy-styles", quick=True)
    assert quick.options() == {"n": 4, "n_locality": 2} and quick.table[2] == ("content", "content")
    with pytest.raises(SuiteError, match="'red' is measured by the toy-colors suite"):
        make_suite("toy-styles").cases("red")
    with pytest.raises(SuiteError, match="toy-objects"):
        make_suite("toy-colors").cases("circle")


def test_evaluate_command_takes_an_attribute_suite_and_refuses_the_wrong_kind_before_loading(tmp_path, capsys):
    args = build_parser().parse_args(
        ["evaluate", "--model", "toy:sd", "--suite", "toy-styles", "--concept", "striped", "--out", str(tmp_path)]
    )
    assert (args.suite, args.concept) == ("toy-styles", "striped")
    code = main(["evaluate", "--model", "/nowhere", "--suite", "toy-colors", "--concept", "striped", "--out", "x"])
    assert code == 2 and "measured by the toy-styles suite" in capsys.readouterr().err


def test_attack_hooks_of_the_attribute_suites():
    styles, colors = ToyStyleSuite(n=3, n_locality=1), ToyColorSuite(n=3, n_locality=1)
    sets = styles.attack_sets("striped")
    assert set(sets) == {"plain", "paraphrase", "synonym"} and len(sets["plain"]) == 3
    assert set(colors.attack_sets("red")) == {"plain", "paraphrase"}  # no synonyms for a colour
    assert styles.concept_words("striped") == ["striped", "stripy", "lined"]
    assert styles.without_concept("striped", "a stripy red circle") == "a solid red circle"
    assert colors.without_concept("red", "a red circle", index=1) == "a blue circle"
    pairs = styles.concept_pairs("striped", 4)
    assert len(pairs) == 4 and all(a.replace("striped", "solid") == b for a, b in pairs)
    images = styles.concept_images("striped", 3, seed=0)
    assert len(images) == 3 and images[0].shape == (3, 32, 32)
    assert styles.inversion_word("striped") not in styles.concept_words("striped")


# ---- lexicons --------------------------------------------------------------------------------


def test_toy_world_lexicon_on_attributes():
    toy = ToyWorldLexicon()
    assert toy.synonyms("striped") == ["stripy", "lined"] and toy.synonyms("red") == []
    assert toy.indirect("striped") == []
    assert toy.irrelevant("striped", "close") == ["solid", "plain", "filled"]
    assert toy.irrelevant("red", "close") == ["green", "blue", "yellow", "purple"]
    assert toy.irrelevant("striped", "mid") == list(COLORS)
    assert "circle" in toy.irrelevant("red", "far")
    vocab = set(vocabulary())
    for tier in ("close", "mid", "far", "unrelated"):
        assert all(set(w.split()) <= vocab for w in toy.irrelevant("striped", tier, None))


def test_auto_lexicon_claims_attributes_on_the_toy_pipelines_only():
    from erasekit.lexicon import auto_lexicon_name
    from erasekit.models import load_pipeline
    from erasekit.toyworld import pipeline_path

    toy = load_pipeline(pipeline_path("sd"))
    assert auto_lexicon_name(toy, "striped") == "toyworld" and auto_lexicon_name(toy, "red") == "toyworld"
    assert auto_lexicon_name(tiny_sd_pipeline(), "striped") == "wordnet"


def test_wordnet_on_an_adjective(monkeypatch):
    import nltk

    from erasekit.lexicon import WordNetLexicon

    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("WordNet must never be downloaded"))
    wordnet = WordNetLexicon()
    assert wordnet.synonyms("striped") == ["stripy"]  # the adjective, not the verb "stripe"
    close, mid = wordnet.irrelevant("striped", "close"), wordnet.irrelevant("striped", "mid")
    assert {"dotted", "floral"} <= set(close) and "plain" in mid
    assert not any("striped" in w or "stripy" in w for w in close + mid)
    assert wordnet.irrelevant("striped", "far") == []
    assert len(wordnet.irrelevant_mixed("striped", ["close", "mid"], 4)) == 4
    assert wordnet.synonyms("car") == ["auto", "automobile", "machine", "motorcar"]  # nouns as before


# ---- every method on an attribute concept, both tiny families ----------------------------------

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("row", list(bench.DEFAULT_METHODS))
@pytest.mark.parametrize("concept", ["red", "striped"])  # one token in the tiny vocabulary; sub-word pieces
def test_every_method_fits_an_attribute_concept(row, family, concept):
    from erasekit.edits import apply, remove
    from erasekit.methods import erase
    from erasekit.models import adapter_for

    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    method = bench.variant_method(row)[0]
    # MACE maps the concept onto a phrase; the fast preset's "white background" is not in the tiny
    # T5 word vocabulary (every unknown word is <unk> there), so the tiny pipelines get one they know
    overrides = {"mace": {"mapping": "the sky"}} if method == "mace" else None
    config = bench.method_configs([row], "fast", overrides, quick=True)[row]
    prompt = f"a {concept} circle"
    assert adapter.token_indices(prompt, concept)  # the adjective is found in the prompt

    def out():  # through the sampler, so that inference-time methods (SLD's guidance) act too
        with torch.no_grad():
            return adapter.generate([prompt], [0], steps=3)

    base = out()
    edit = erase(pipe, concept, method, config, progress=False)
    assert edit.method == method and edit.concepts == [concept]
    apply(pipe, edit)
    try:
        assert (out() - base).abs().max() > 1e-4
    finally:
        remove(pipe, edit)
    assert torch.equal(out(), base)


# ---- the bench -----------------------------------------------------------------------------------


def test_bench_checks_concepts_and_accepts_attributes():
    with pytest.raises(ValueError, match="unknown toy-world concept 'plaid'"):
        bench.run_bench({"sd": None}, ["uce"], concepts=["striped", "plaid"], progress=False)
    with pytest.raises(ValueError, match="unknown development concept"):
        bench.run_bench({"sd": None}, ["uce"], concepts=["striped"], tune=True, dev_concept="plaid", progress=False)
    args = build_parser().parse_args(["bench", "toy", "--concepts", "striped,red", "--quick"])
    assert args.concepts == "striped,red"


def test_bench_rows_of_attribute_concepts_use_their_suite_and_content(tmp_path):
    from test_bench import StubDetector

    result = bench.run_bench(
        {"sd": tiny_sd_pipeline()},
        ["keyword_zeroing"],
        concepts=["circle", "striped", "red"],
        n=1,
        n_locality=1,
        out=tmp_path / "bench",
        detector=StubDetector(),
        progress=False,
    )
    assert not result["errors"]
    rows = {(r["concept"], r["method"]): r for r in result["rows"]}
    assert rows["striped", "base"]["suite"] == "toy-styles" and rows["red", "base"]["suite"] == "toy-colors"
    assert rows["striped", "base"]["n_images"] == 3 + 3  # simple, paraphrase, synonym; solid, plain, filled
    assert "suite" not in rows["circle", "base"]["settings"]  # object rows keep their keys
    assert rows["striped", "base"]["settings"]["suite"] == "toy-styles"
    for r in result["rows"]:
        if r["suite"] == "toy-objects":
            assert "content" not in r and "color_accuracy" in r
        else:
            assert 0 <= r["content"] <= 100
            terms = (r["acc_e"], r["acc_r"], r["acc_l"])
            assert r["h"] == pytest.approx(harmonic_h(*terms, content=r["content"]), nan_ok=True)
            assert r["worst_h"] == pytest.approx(r["h"], nan_ok=True)
    means = result["means"]
    assert [(m.get("suite", "toy-objects"), m["method"]) for m in means] == [
        (s, m) for s in ("toy-objects", "toy-styles", "toy-colors") for m in ("base", "keyword_zeroing")
    ]
    assert all("content" in m for m in means if m.get("suite"))
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "| model | suite | method | eta | Acc_E | Acc_R | Acc_L | content | H |" in md
    assert "| sd | toy-styles | base |" in md
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved["settings"]["concepts"] == ["circle", "striped", "red"]
