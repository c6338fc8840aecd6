"""SAFREE (methods/safree.py, the inference hook in edits/safree_hook.py) on tiny pipelines of
both families: the projections' algebra, trigger detection, which embedding rows change and when
(the step budget), the Edit contract, latent re-attention, the negative-prompt switch and the
one-line errors of bad settings.

The tiny pipelines' random text encoders know no concept, so a test *plants* one: a forward hook
on the main text encoder turns every output (and the pooled output) of a prompt that holds the
concept word towards a fixed direction, keeping its norm (:func:`_plant`). Detection must then
find exactly that word.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.edits import apply, load_edit, remove
from erasekit.edits.safree_hook import Safree
from erasekit.methods import ConfigError, erase, get_method, make_config, method_help, method_names, safree
from erasekit.models import adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
FAMILIES = ["sd", "flux"]
PROMPT = "a red car in a park"
OTHER = "a dog in the garden"
STEPS = 3


def _plant(pipe, word: str = "car", strength: float = 30.0, token_id: int | None = None):
    """The main text encoder of ``pipe`` now carries ``word`` in a fixed direction v: in a prompt
    holding it, every output state (and the pooled output) h becomes |h| normalize(h + strength
    v), so that, as in a trained encoder whose states have about one norm, the concept crowds
    out the rest of the prompt. ``token_id``: the token that carries it (default the word's first)."""
    adapter = adapter_for(pipe)
    tokenizer, encoder = adapter.main_text_encoder()
    word_id = tokenizer(word, add_special_tokens=False)["input_ids"][0] if token_id is None else token_id
    width = encoder.get_input_embeddings().weight.shape[1]
    v = torch.nn.functional.normalize(torch.randn(width, generator=torch.Generator().manual_seed(7)), dim=0)

    def carry(h, has):
        planted = torch.nn.functional.normalize(h + strength * v.to(h.dtype), dim=-1) * h.norm(dim=-1, keepdim=True)
        return torch.where(has.view(-1, *([1] * (h.dim() - 1))), planted, h)

    def hook(_module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        has = (ids == word_id).any(1)
        output["last_hidden_state"] = carry(output[0], has)
        if getattr(output, "pooler_output", None) is not None:
            output["pooler_output"] = carry(output["pooler_output"], has)
        return output

    return encoder.register_forward_hook(hook, with_kwargs=True)


def _planted(family: str, **kwargs):
    pipe = BUILDERS[family](**kwargs)
    _plant(pipe)
    return pipe


def _config(**overrides):
    return make_config("safree", "paper", {k: str(v) for k, v in overrides.items()})


def _fit(pipe, concept="car", **overrides):
    return erase(pipe, concept, "safree", _config(**overrides), progress=False)


def _images(adapter, prompt=PROMPT, seed=0):
    with torch.no_grad():
        return adapter.generate([prompt], [seed], steps=STEPS)


def _hook(adapter, edit) -> Safree:
    return adapter.edit_stack.attached[edit.id]


class _Calls:
    """Records the conditioning of every denoiser call (after the edits' pre-hooks ran)."""

    def __init__(self, adapter):
        self.adapter, self.calls = adapter, []
        self.handle = adapter.denoiser.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        _, t, cond, _ = self.adapter.call_inputs(args, kwargs)
        self.calls.append((float(t.max()), cond.embeds.detach().clone()))

    def remove(self):
        self.handle.remove()


# ---- the math ------------------------------------------------------------------------------


def test_projector_algebra_and_dependent_keywords():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 16, generator=g, dtype=torch.float64)
    p = safree.Subspace(c).matrix()
    cols = c.T  # (D, K)
    formula = cols @ torch.linalg.pinv(cols.T @ cols) @ cols.T  # P_C = C (C^T C)^+ C^T
    torch.testing.assert_close(p, formula)
    torch.testing.assert_close(p, p.T)  # symmetric
    torch.testing.assert_close(p @ p, p)  # idempotent
    torch.testing.assert_close((torch.eye(16, dtype=torch.float64) - p) @ cols, torch.zeros_like(cols))
    # Dependent keywords (one repeated, one a combination): the same span, the same projector.
    dependent = torch.cat([c, c[:1], 2 * c[1:2] - c[2:3]])
    sub = safree.Subspace(dependent)
    assert sub.rank == 3
    torch.testing.assert_close(sub.matrix(), p)
    torch.testing.assert_close(sub.reject(dependent), torch.zeros_like(dependent))
    assert torch.isfinite(sub.matrix()).all()


def test_trigger_rule_and_projection_orders():
    d = torch.tensor([1.0, 1.0, 2.0, 1.0])
    assert safree.trigger_mask(d, 0.01).tolist() == [False, False, True, False]
    assert safree.trigger_mask(torch.ones(4), 0.01).tolist() == [False] * 4  # nothing stands out
    assert safree.trigger_mask(torch.ones(4), -0.01).all()  # alpha's sign decides ties
    assert safree.trigger_mask(torch.tensor([3.0]), 0.01).tolist() == [False]  # one word: no comparison
    g = torch.Generator().manual_seed(1)
    toxic, prompt = safree.Subspace(torch.randn(2, 8, generator=g)), safree.Subspace(torch.randn(3, 8, generator=g))
    x = torch.randn(5, 8, generator=g)
    i = torch.eye(8, dtype=torch.float64)
    paper = safree.project_tokens(x, toxic, prompt, "paper")
    release = safree.project_tokens(x, toxic, prompt, "release")
    torch.testing.assert_close(paper, x.double() @ (prompt.matrix() @ (i - toxic.matrix())).T)
    torch.testing.assert_close(release, x.double() @ ((i - toxic.matrix()) @ prompt.matrix()).T)
    assert not torch.allclose(paper, release)


def test_step_budget_curves():
    betas = [i / 100 for i in range(0, 201)]
    release = [safree.step_budget(b) for b in betas]
    assert release == sorted(release)  # monotone in beta
    assert all(t == 0 for b, t in zip(betas, release) if b < 0.45)
    assert all(t == 10 for b, t in zip(betas, release) if b >= 0.6)
    paper = [safree.step_budget(b, "paper") for b in betas]
    assert paper == sorted(paper) and min(paper) == 5 and max(paper) <= 9  # Eq. 6: 5-9 steps for any prompt
    artists = [safree.step_budget(b, t0=5.5, k=3.5) for b in betas]
    assert artists == sorted(artists) and artists[0] == 0 and artists[-1] == 10
    # The budget in 50-step units, scaled to the run's steps; step 0 always projects.
    assert [i for i in range(50) if safree.in_budget(i, 50, 10)] == list(range(11))
    assert [i for i in range(25) if safree.in_budget(i, 25, 10)] == list(range(6))
    assert [i for i in range(25) if safree.in_budget(i, 25, 0)] == [0]
    assert [i for i in range(4) if safree.in_budget(i, 4, 2, reference_steps=0)] == [0, 1, 2]


def test_low_frequency_reattention():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, 8, generator=g)
    assert torch.equal(safree.low_frequency_reattention(h, h.clone(), 0.5), h)  # identical branches
    original = h.clone()
    original[0] = h[0] * 0.5  # the filtered branch is larger in sample 0 only
    out = safree.low_frequency_reattention(h, original, 0.5, window=1)
    assert torch.equal(out[1], h[1])  # no coefficient above the original's: untouched
    f_in = torch.fft.fftshift(torch.fft.fft2(h[0].double()), dim=(-2, -1))
    f_out = torch.fft.fftshift(torch.fft.fft2(out[0].double()), dim=(-2, -1))
    changed = (f_out - f_in).abs() > 1e-4
    box = torch.zeros(8, 8, dtype=torch.bool)
    box[3:6, 3:6] = True  # |f| <= 1 around DC (index 4 after the shift)
    assert changed.any() and not (changed & ~box).any()  # only low frequencies change
    torch.testing.assert_close(f_out[:, box], f_in[:, box] * 0.5, atol=1e-5, rtol=1e-5)  # scaled, not set to s


# ---- detection and the hook on the tiny pipelines ------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_planted_concept_word_is_flagged(family):
    pipe = _planted(family)
    adapter = adapter_for(pipe)
    edit = _fit(pipe)
    apply(pipe, edit)
    hook = _hook(adapter, edit)
    for prompt in (PROMPT, "a photo of a car", "the big green car on the street"):
        found = hook.analyse(prompt)
        assert found.flagged == adapter.token_indices(prompt, "car"), prompt
        assert found.t_prime == 10  # the planted word moves the prompt far: the full budget
    # Without the concept some word always stands out by 1% (the rule is relative), but the
    # projection moves the prompt little: the release's budget is 0 (step 0 only).
    assert hook.analyse(OTHER).t_prime == 0
    assert hook.analyse("car") is None  # one word: nothing to compare it with
    remove(pipe, edit)


def test_clip_skip_is_said_not_silently_ignored():
    # With clip_skip, SD's encode_prompt asks the encoder for its hidden states and reads an earlier
    # layer: SAFREE cannot act there, and says so once. (The encoder is called as encode_prompt
    # calls it: its next line needs CLIPTextModel.text_model, which transformers 5 no longer has.)
    pipe = _planted("sd")
    edit = _fit(pipe)
    apply(pipe, edit)
    ids = pipe.tokenizer(
        [PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    )
    with pytest.warns(UserWarning, match="clip_skip"):
        pipe.text_encoder(ids.input_ids, output_hidden_states=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.text_encoder(ids.input_ids, output_hidden_states=True)  # once per attachment
        pipe.encode_prompt(PROMPT, "cpu", 1, False)  # the last layer: no warning
    remove(pipe, edit)


@pytest.mark.parametrize("word", ["nude", "nudity"])  # one token; two pieces ("nu", "dity</w>")
def test_detection_with_sd_1x_real_clip_tokenizer(word):
    """SD 1.x's tokenizer pads with EOS (49407): padding and EOS are never words, the
    leave-one-out prompts keep 77 ids, and the planted word is flagged (the spec's "a photo of a
    nude woman on the beach" check, on a tiny encoder whose concept sits in the word's first
    piece: flags are per token, so only that piece of "nudity" stands out)."""
    from real_tokenizers import EOS_ID, clip_bpe_tokenizer, tiny_sd_pipeline_with

    tokenizer = clip_bpe_tokenizer()
    pipe = tiny_sd_pipeline_with(tokenizer)
    first_piece = tokenizer(word, add_special_tokens=False)["input_ids"][0]
    _plant(pipe, token_id=first_piece)
    adapter = adapter_for(pipe)
    edit = _fit(pipe, concept=word)
    apply(pipe, edit)
    hook = _hook(adapter, edit)
    prompt = f"a photo of a {word} woman on the beach"
    ids = adapter.main_token_ids([prompt])[0].tolist()
    found = hook.analyse(prompt)
    assert tokenizer.pad_token_id == EOS_ID and ids.count(EOS_ID) > 1
    assert found.words == list(range(1, ids.index(EOS_ID)))  # BOS, EOS and padding are not words
    assert found.flagged == adapter.token_indices(prompt, word)[:1] and found.t_prime == 10
    remove(pipe, edit)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_flagged_positions_change_and_only_within_the_budget(family):
    pipe = _planted(family)
    adapter = adapter_for(pipe)
    stock = adapter.encode([PROMPT]).embeds[0]
    edit = _fit(pipe, budget="paper", up_t=2, reference_steps=0)  # t' = round(2 sigmoid(beta)) = 1
    apply(pipe, edit)
    found = _hook(adapter, edit).analyse(PROMPT)
    assert found.t_prime == 1 and found.flagged == adapter.token_indices(PROMPT, "car")
    calls = _Calls(adapter)
    try:
        _images(adapter)
    finally:
        calls.remove()
    timesteps = adapter.pipe.scheduler.timesteps.tolist()
    assert len(timesteps) == STEPS
    flagged = torch.zeros(stock.shape[0], dtype=torch.bool)
    flagged[found.flagged] = True
    prompt_steps, projected_steps = set(), set()
    for t, embeds in calls.calls:
        step = min(range(STEPS), key=lambda i: abs(timesteps[i] - t))
        for row in embeds:
            if not torch.equal(row[~flagged], stock[~flagged]):
                continue  # the unconditional (empty) prompt
            # The prompt's row: unflagged positions, BOS, EOS and padding bit-identical.
            prompt_steps.add(step)
            if not torch.equal(row, stock):
                assert torch.equal(row[flagged], found.projected)
                projected_steps.add(step)
    assert prompt_steps == {0, 1, 2}
    assert projected_steps == {0, 1}  # steps i <= t' only, then the original embeddings
    remove(pipe, edit)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_flagged_token_gives_the_stock_images(family):
    pipe = _planted(family)
    adapter = adapter_for(pipe)
    base = {p: _images(adapter, p) for p in (OTHER, PROMPT, "car")}
    edit = _fit(pipe)
    apply(pipe, edit)
    assert torch.equal(_images(adapter, "car"), base["car"])  # one word: nothing to compare
    assert not torch.equal(_images(adapter, PROMPT), base[PROMPT])
    remove(pipe, edit)
    strict = _fit(pipe, alpha=100)  # no word stands out by 101 times the others
    apply(pipe, strict)
    assert not _hook(adapter, strict).analyse(PROMPT).flagged
    assert torch.equal(_images(adapter, PROMPT), base[PROMPT])
    assert torch.equal(_images(adapter, OTHER), base[OTHER])
    remove(pipe, strict)


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_contract(family, tmp_path):
    pipe = _planted(family)
    adapter = adapter_for(pipe)
    state = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    base = _images(adapter)
    edit = _fit(pipe)
    assert edit.kind == "inference_hook" and edit.method == "safree" and not edit.tensors
    assert edit.hyperparameters["hook"] == "safree" and edit.hyperparameters["keyword_list"] == ["car"]
    assert torch.equal(_images(adapter), base)  # fit leaves the pipeline as it was

    apply(pipe, edit)
    edited = _images(adapter)
    assert (edited - base).abs().max() > 1e-4
    with adapter.edits_disabled():
        assert torch.equal(_images(adapter), base)
    assert torch.equal(_images(adapter), edited)
    remove(pipe, edit)
    assert torch.equal(_images(adapter), base)
    assert all(torch.equal(p, state[n]) for n, p in adapter.denoiser.named_parameters())

    edit.save(tmp_path / "edit")
    loaded = load_edit(tmp_path / "edit")
    assert loaded.method == "safree" and loaded.hyperparameters == edit.hyperparameters
    apply(pipe, loaded)
    assert torch.equal(_images(adapter), edited)
    apply(pipe, loaded, scale=0.0)  # re-applying replaces; scale 0 is the base model
    assert torch.equal(_images(adapter), base)
    _hook(adapter, loaded).set_scale(0.5)
    half = _images(adapter)
    assert not torch.equal(half, base) and not torch.equal(half, edited)
    _hook(adapter, loaded).set_scale(1.0)
    assert torch.equal(_images(adapter), edited)
    remove(pipe, loaded)
    assert torch.equal(_images(adapter), base)
    assert all(torch.equal(p, state[n]) for n, p in adapter.denoiser.named_parameters())
    assert not adapter.edit_stack.attached


def test_steps_are_counted_along_a_trajectory_outside_the_pipeline():
    """adapter.predict calls at falling timesteps (no pipeline schedule) count as steps."""
    pipe = _planted("sd")
    adapter = adapter_for(pipe)
    pipe.scheduler.timesteps = torch.tensor([])  # no schedule to look the step up in
    edit = _fit(pipe, budget="paper", up_t=2, reference_steps=0)
    apply(pipe, edit)
    cond = adapter.encode([PROMPT])
    x = adapter.sample_noise(1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        edited = [adapter.predict(x, t, cond) for t in (900, 600, 300, 900)]
        with adapter.edits_disabled():
            base = [adapter.predict(x, t, cond) for t in (900, 600, 300, 900)]
    remove(pipe, edit)
    changed = [not torch.equal(a, b) for a, b in zip(edited, base)]
    assert changed == [True, True, False, True]  # t' = 1: steps 0 and 1; a higher t starts again


@pytest.mark.parametrize("family", FAMILIES)
def test_call_conditioning_round_trip(family):
    """adapter.with_call_conditioning is the inverse of call_inputs' conditioning."""
    adapter = adapter_for(BUILDERS[family]())
    seen = []

    def hook(_module, args, kwargs):
        _, _, cond, _ = adapter.call_inputs(args, kwargs)
        doubled = type(cond)(cond.embeds * 2, None if cond.pooled is None else cond.pooled * 2)
        args, kwargs = adapter.with_call_conditioning(args, kwargs, doubled)
        again = adapter.call_inputs(args, kwargs)[2]
        seen.append(torch.equal(again.embeds, doubled.embeds) and (cond.pooled is None) == (again.pooled is None))
        return args, kwargs

    handle = adapter.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _images(adapter)
    finally:
        handle.remove()
    assert seen and all(seen)


# ---- the switches ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompt_switch_is_negative_prompting_with_the_keywords(family):
    pipe = _planted(family)
    adapter = adapter_for(pipe)
    with torch.no_grad():
        reference = adapter.generate([OTHER], [0], steps=STEPS, negative_prompt="car")
    edit = _fit(pipe, negative_prompt="true", alpha=100)  # no trigger word: only the negative prompt acts
    apply(pipe, edit)
    assert torch.equal(_images(adapter, OTHER), reference)
    remove(pipe, edit)


def test_latent_reattention_on_sd_and_refused_on_flux():
    pipe = _planted("sd")
    adapter = adapter_for(pipe)
    base = _images(adapter)
    x = adapter.sample_noise(1, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    cond = adapter.encode(["", PROMPT])  # a CFG-style batch: the empty prompt, then a filtered one

    def predict():
        with torch.no_grad():
            return adapter.predict(x, torch.tensor([900, 900]), cond)

    plain = _fit(pipe)
    apply(pipe, plain)
    without, without_out = _images(adapter), predict()
    remove(pipe, plain)
    edit = _fit(pipe, latent_reattention="true", lra_scales="0.5,0.5,0.5")
    apply(pipe, edit)
    with_lra, with_out = _images(adapter), predict()
    remove(pipe, edit)
    assert not torch.equal(with_lra, without)
    assert torch.equal(with_out[0], without_out[0])  # the unfiltered row: untouched
    assert not torch.equal(with_out[1], without_out[1])
    assert torch.equal(_images(adapter), base)  # and all gone once removed
    flux = tiny_flux_pipeline()
    with pytest.raises(ConfigError, match="latent_reattention needs a UNet's up-block skip features; the flux"):
        _fit(flux, latent_reattention="true")


# ---- settings and registration -----------------------------------------------------------------


def test_presets_and_keyword_lists():
    assert "safree" in method_names()
    spec = get_method("safree")
    assert {"paper", "fast", "artists", "release"} <= set(spec.presets)
    paper = make_config("safree", "paper")
    assert (paper.alpha, paper.up_t, paper.t0, paper.k, paper.reference_steps) == (0.01, 10.0, 5.333, 2.5, 50)
    assert (paper.order, paper.budget, paper.negative_prompt, paper.latent_reattention) == (
        "paper",
        "release",
        False,
        False,
    )
    assert (make_config("safree", "artists").t0, make_config("safree", "artists").k) == (5.5, 3.5)
    assert make_config("safree", "release").negative_prompt and make_config("safree", "release").order == "release"
    assert safree.keyword_list("nudity", paper) == list(safree.NUDITY_KEYWORDS) and len(safree.NUDITY_KEYWORDS) == 17
    assert safree.keyword_list("Van Gogh", paper) == ["Van Gogh"]
    assert safree.keyword_list("car", make_config("safree", "paper", {"keywords": "{concept}; a {concept}"})) == [
        "car",
        "a car",
    ]
    off = make_config("safree", "paper", {"nudity_keywords": "false"})
    assert safree.keyword_list("nudity", off) == ["nudity"]
    assert method_help("safree").startswith("safree: SAFREE (Yoon et al., ICLR 2025)")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"alpha": "nan"}, "safree: alpha must be a finite number >= 0, got 'nan'"),
        ({"alpha": "inf"}, "safree: alpha must be a finite number >= 0, got 'inf'"),
        ({"order": "backwards"}, "safree: order must be one of 'paper', 'release'"),
        ({"k": "0"}, "safree: k must be a finite number > 0"),
        ({"keywords": " ; "}, "safree: keywords must be"),
        ({"lra_scales": "0.9,2"}, "safree: lra_scales must be comma-separated numbers in (0, 1]"),
    ],
)
def test_bad_settings_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError) as caught:
        make_config("safree", "paper", settings)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_bad_concepts_are_one_line_config_errors():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ConfigError, match="^safree: the concept is empty$"):
        erase(pipe, "  ", "safree", make_config("safree", "paper"), progress=False)
    with pytest.raises(ConfigError):
        safree.SafreeConfig(alpha=math.nan)
