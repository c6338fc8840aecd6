"""UnlearnDiffAtk (Zhang et al., ECCV 2024): the simplex projection, the straight-through token
draw, the prompt assembly, the loss on the edited model, the early stop and the paper's ASR."""

from dataclasses import replace

import pytest
import torch
from attack_helpers import attack_uce_circle
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.edits import apply, remove
from erasekit.evaluation.attacks import AttackContext, make_attack_config, pre_post_rates
from erasekit.evaluation.attacks.unlearndiffatk import (
    TokenPrompt,
    UnlearnDiffAtkConfig,
    allowed_tokens,
    project_simplex,
    project_simplex_bisection,
    run_unlearndiffatk,
    straight_through_one_hot,
    timestep_grid,
    token_loss,
)
from erasekit.evaluation.suites import Case
from erasekit.methods import uce
from erasekit.methods.uce import UCEConfig
from erasekit.models import adapter_for, frozen

SMALL = {"n": 2, "n_locality": 1}


@pytest.fixture(scope="module")
def edited_sd():
    pipe = tiny_sd_pipeline(seed=0)
    return pipe, uce.fit(pipe, "circle", UCEConfig(), progress=False)


def test_projection_lands_on_the_simplex_and_agrees_with_bisection():
    g = torch.Generator().manual_seed(0)
    u = torch.cat([torch.randn(4, 300, generator=g), torch.rand(2, 300, generator=g) / 300, torch.zeros(1, 300)])
    p = project_simplex(u)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(len(u)), atol=1e-5)
    assert torch.allclose(p, project_simplex_bisection(u, tol=1e-7), atol=1e-5)
    assert torch.allclose(project_simplex(p), p, atol=1e-6)  # idempotent
    vertex = torch.zeros(3, 300)
    vertex[torch.arange(3), torch.tensor([0, 7, 299])] = 1
    assert torch.equal(project_simplex(vertex), vertex)
    # the closest point: no other point of the simplex is nearer (a few random ones)
    others = project_simplex(torch.rand(50, 300, generator=g) * 3)
    assert ((u[:1] - p[:1]).norm(dim=-1) <= (u[:1] - others).norm(dim=-1) + 1e-6).all()


def test_special_tokens_are_never_drawn():
    pipe = tiny_flux_pipeline(seed=0)
    tokenizer, encoder = adapter_for(pipe).main_text_encoder()
    mask = allowed_tokens(tokenizer, encoder.get_input_embeddings().weight.shape[0])
    assert not mask[tokenizer.all_special_ids].any() and mask.sum() == len(tokenizer) - len(tokenizer.all_special_ids)


def test_straight_through_forward_is_a_row_of_w_and_its_gradient_the_clipped_one_hot_gradient(sd):
    prompt = TokenPrompt(sd, "a red car", 2)
    weight = prompt.weight.detach()
    u = torch.nn.Parameter(torch.full((2, weight.shape[0]), 1.0 / weight.shape[0]))
    ids = torch.tensor([5, 17])
    z = straight_through_one_hot(u, ids)
    assert torch.equal(z @ weight, weight[ids])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((1,) + sd.latent_shape(), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([500])
    with frozen(*sd.pipe.components.values()):
        (token_loss(sd, prompt, u, ids, x0, noise, t) * 1e4).backward()
        onehot = torch.nn.functional.one_hot(ids, weight.shape[0]).float().requires_grad_()
        cond = prompt.encode(onehot @ weight)
        pred = sd.predict(sd.add_noise(x0, noise, t), t, cond)
        (torch.nn.functional.mse_loss(pred, noise) * 1e4).backward()
    assert onehot.grad.abs().max() > 1  # the clip matters here
    assert torch.allclose(u.grad, onehot.grad.clamp(-1, 1), atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_the_tokens_go_first_and_the_prompt_moves_by_k(family, request):
    adapter = request.getfixturevalue(family)
    tokenizer, encoder = adapter.main_text_encoder()
    _, length = adapter._main_tokenizer()
    k, text = 3, "a photo of a red car"
    prompt = TokenPrompt(adapter, text, k)
    plain = tokenizer(text, padding="max_length", max_length=length, truncation=True)["input_ids"]
    ids = prompt.assemble([5, 6, 7])[0].tolist()
    first = 1 if family == "sd" else 0  # CLIP's BOS stays first; T5 has none
    assert len(ids) == length and ids[first : first + k] == [5, 6, 7]
    assert ids[:first] == plain[:first] and ids[first + k :] == plain[first : length - k]
    # the slots' embeddings written by the hook are the tokens' own: same as encoding the ids
    weight = prompt.weight.detach()
    with torch.no_grad():
        by_hook = prompt.encode(weight[torch.tensor([5, 6, 7])]).embeds
        by_ids = encoder(prompt.assemble([5, 6, 7]))[0].to(by_hook.dtype)
    assert torch.allclose(by_hook, by_ids, atol=1e-5)
    words = prompt.text([5, 6, 7])
    assert words.endswith(text) and prompt.survives(words, [5, 6, 7]) == (
        tokenizer(words, padding="max_length", max_length=length, truncation=True)["input_ids"] == ids
    )


def test_the_grids():
    sd = adapter_for(tiny_sd_pipeline(seed=0))
    assert timestep_grid(sd, 50).tolist() == list(range(10, 1000, 20))
    flux = adapter_for(tiny_flux_pipeline(seed=0))
    plain = timestep_grid(flux, 50, shift=False)
    assert torch.allclose(plain, (torch.arange(50) + 0.5) / 50 * 1000)
    shifted = timestep_grid(flux, 50, shift=True, tokens=64)
    assert (shifted.diff() > 0).all() and 0 < shifted[0] and shifted[-1] < 1000


def test_the_loss_is_the_edited_models(edited_sd):
    pipe, edit = edited_sd
    adapter = adapter_for(pipe)
    prompt = TokenPrompt(adapter, "a circle in a garden", 3)
    u = torch.full((3, prompt.weight.shape[0]), 1.0 / prompt.weight.shape[0])
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((1,) + adapter.latent_shape(), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ids, t = torch.tensor([3, 4, 5]), torch.tensor([300])
    apply(pipe, edit)
    try:
        with torch.no_grad():
            edited = token_loss(adapter, prompt, u, ids, x0, noise, t)
            with adapter.edits_disabled():
                base = token_loss(adapter, prompt, u, ids, x0, noise, t)
    finally:
        remove(pipe, edit)
    with torch.no_grad():
        unedited = token_loss(adapter, prompt, u, ids, x0, noise, t)
    assert not torch.isclose(edited, base) and torch.isclose(base, unedited)


class ScriptedContext(AttackContext):
    """An AttackContext whose detector says yes at the given judge calls (1-based), and which
    counts generations and remembers the images given to encode_images."""

    yes_at: tuple = ()
    calls: int = 0
    generated: list = None

    def judge(self, images):
        out = []
        for _ in images:
            self.calls += 1
            out.append((self.calls in self.yes_at, 0.5))
        return out

    def generate(self, prompts, cases):
        self.generated = (self.generated or []) + list(prompts)
        return super().generate(prompts, cases)


def scripted(pipe, tmp_path, pre, yes_at=()):
    adapter = adapter_for(pipe)
    cases = [Case("a circle in a garden", 11 + i) for i in range(len(pre))]
    base = [adapter.generate([c.prompt], [c.seed])[0] for c in cases]
    ctx = ScriptedContext(
        pipe, adapter, "circle", None, None, "uce", cases, base, list(pre), tmp_path / "a" / "uce", progress=False
    )
    ctx.yes_at = tuple(yes_at)
    return ctx


def test_early_stop_and_a_pre_successful_prompt_counts_once(edited_sd, tmp_path, monkeypatch):
    pipe, edit = edited_sd
    ctx = scripted(pipe, tmp_path, pre=[True, False, False], yes_at=(1, 3))
    seen = []
    real = type(ctx.adapter).encode_images
    monkeypatch.setattr(
        type(ctx.adapter), "encode_images", lambda self, images, g=None: seen.append(images) or real(self, images, g)
    )
    config = UnlearnDiffAtkConfig(grid=4, iterations=2)
    apply(pipe, edit)
    try:
        out = run_unlearndiffatk(ctx, config)
    finally:
        remove(pipe, edit)
    # judge call 1: the pre-successful prompt's plain image (not attacked: no steps, no candidates);
    # call 2: prompt 1's first candidate (no); call 3: its second (yes: stop after 2 of 4 timesteps);
    # prompt 2: calls 4-7, no success in 4 candidates.
    r0, r1, r2 = out.records
    assert r0["pre"] and r0["post"] is None and r0["candidates"] == 0 and r0["final"] == ctx.cases[0].prompt
    assert r1["post"] and r1["candidates"] == 2 and r1["steps"] == 4 and len(r1["losses"]) == 2
    assert not r2["post"] and r2["candidates"] == 4 and r2["steps"] == 8
    assert ctx.generated[0] == ctx.cases[0].prompt and ctx.generated[2] == r1["final"]
    assert out.figures["detector_budget"] == 6 and out.figures["pre_asr"] == pytest.approx(100 / 3)
    assert out.asr == pytest.approx(200 / 3) and out.figures["attack_only_asr"] == pytest.approx(50)
    assert "pre-successful" in out.definition and len(out.images) == 3
    assert all(r["file"].endswith(f"{i:05d}.png") for i, r in enumerate(out.records))
    # x0 is the latent of the base model's image given by the runner
    assert torch.equal(seen[0], ctx.base_images[1][None] * 2 - 1)
    # fixed budget: only the final string is judged, no early stop
    ctx = scripted(pipe, tmp_path, pre=[False], yes_at=(1,))
    out = run_unlearndiffatk(ctx, replace(config, fixed_budget=True))
    assert out.records[0]["candidates"] == 1 and out.records[0]["steps"] == 8 and out.asr == 100


def test_pre_post_rates_count_pre_or_post():
    pre = [True, True, False, False, False, False]
    post = [None, None, True, False, True, False]
    rates = pre_post_rates(pre, post)
    assert rates == {"pre_asr": pytest.approx(100 / 3), "asr": pytest.approx(200 / 3), "attack_only_asr": 50}
    assert rates["pre_asr"] <= rates["asr"] <= 100
    assert pre_post_rates([True, True], [None, None])["asr"] == 100
    with pytest.raises(ValueError):
        pre_post_rates([True], [])


def test_the_same_seed_gives_the_same_attack(edited_sd, tmp_path):
    pipe, edit = edited_sd
    config = UnlearnDiffAtkConfig(grid=2, iterations=3, seed=4)
    finals = []
    apply(pipe, edit)
    try:
        for seed in (4, 4, 5):
            ctx = scripted(pipe, tmp_path, pre=[False, False])
            out = run_unlearndiffatk(ctx, replace(config, seed=seed))
            finals.append([(r["token_ids"], r["losses"]) for r in out.records])
    finally:
        remove(pipe, edit)
    assert finals[0] == finals[1] and finals[0] != finals[2]
    assert finals[0][0] != finals[0][1]  # each prompt draws its own


def test_settings_and_quick():
    assert make_attack_config("unlearndiffatk", quick=True).grid == 2
    config = make_attack_config("unlearndiffatk", {"tokens": "5", "fixed_budget": "true"})
    assert config.tokens == 5 and config.fixed_budget and config.lr == 0.01 and config.weight_decay == 0.1


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_flux_pipeline])
def test_end_to_end(make, tmp_path):
    pipe = make(seed=0)
    results = attack_uce_circle(pipe, tmp_path, ["unlearndiffatk"], quick=True, suite_options=SMALL)
    found = results["attack_results"]["unlearndiffatk"]["uce"]
    assert results["configs"]["unlearndiffatk"]["grid"] == 2
    assert "Zhang et al., ECCV 2024" in results["references"]["unlearndiffatk"]
    assert results["asr"]["uce"]["unlearndiffatk"] == found["asr"] == found["figures"]["asr"]
    assert found["figures"]["pre_asr"] == results["asr"]["uce"]["no attack"]
    assert len(found["cases"]) == 2 and all((tmp_path / c["file"]).is_file() for c in found["cases"])
    for c in found["cases"]:
        if not c["pre"]:
            assert c["final"].endswith(c["prompt"]) and 1 <= c["candidates"] <= 2 and len(c["token_ids"]) == 3
    assert (tmp_path / "report.html").is_file()
