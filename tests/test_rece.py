"""RECE on tiny pipelines of both families: its closed forms solve what they claim, the derived
embedding regenerates the concept on the edited model until a round erases it, the retain list and
the regulariser do what the spec (METHODS2.md, "RECE") says, and the Edit is a plain,
deterministic weight-delta edit."""

import dataclasses
import logging

import pytest
import torch
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.cli import main
from erasekit.edits import apply, load_edit, remove
from erasekit.edits.weight_delta import export_merged
from erasekit.methods import ConfigError, erase, get_method, make_config, method_help, rece, uce
from erasekit.methods.rece import RECEConfig, closed_form, regeneration_map
from erasekit.methods.uce import UCEConfig
from erasekit.models import adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
FAMILIES = list(BUILDERS)
CONFIG = RECEConfig(samples=1)  # the release's settings; one (noise, timestep) draw for Flux


def _fit(pipe, concept="car", **overrides):
    return rece.fit(pipe, concept, dataclasses.replace(CONFIG, **overrides), progress=False)


def _points(adapter):
    return [p for p in adapter.attachment_points("text_proj") if p.role in ("k", "v")]


def _inputs(adapter, prompts, seed=0):
    """point name -> (len(prompts), L, d) float64: each k/v projection's input on the prompts, in a
    denoiser pass at the draw ``fit`` makes first with ``seed``."""
    records = {}
    handles = [
        p.module.register_forward_pre_hook(lambda _m, a, n=p.name: records.__setitem__(n, a[0].detach().double()))
        for p in _points(adapter)
    ]
    g = torch.Generator().manual_seed(seed)
    x, t = adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)
    with torch.no_grad():
        adapter.predict(x.expand(len(prompts), *x.shape[1:]), t.expand(len(prompts)), adapter.encode(prompts))
    for h in handles:
        h.remove()
    return records


def _groups(adapter, records):
    """The k/v points grouped by the input they read (SD: one group; Flux: one per block)."""
    groups: list[list[str]] = []
    for p in _points(adapter):
        for group in groups:
            if torch.equal(records[group[0]], records[p.name]):
                group.append(p.name)
                break
        else:
            groups.append([p.name])
    return groups


def _weights(adapter, edit=None):
    """point name -> W0 (+ the edit's delta), float64."""
    out = {}
    for p in _points(adapter):
        w = p.module.weight.detach().double()
        out[p.name] = w + edit.tensors[f"delta.{p.name}.weight"].double() if edit is not None else w
    return out


def _derive(ws, w0s, rows, regular_scale):
    """c' for ``rows`` (n, d), written out: the ridge normal equations of step A."""
    gram = sum(w.T @ w for w in ws) + regular_scale * torch.eye(rows.shape[1], dtype=rows.dtype)
    return torch.linalg.solve(gram, sum(w.T @ w0 for w, w0 in zip(ws, w0s)) @ rows.T).T


def _regen(ws, w0s, derived, rows):
    """sum_l ||W_l c' - W0_l c||^2 over the rows."""
    return float(sum(((derived @ w.T - rows @ w0.T) ** 2).sum() for w, w0 in zip(ws, w0s)))


# ---- registration, presets, help -------------------------------------------------------------


def test_registered_with_the_release_presets_and_help(capsys):
    spec = get_method("rece")
    assert spec.config_class is RECEConfig and {"paper", "fast"} <= set(spec.presets)
    paper = make_config("rece", "paper")
    assert (paper.rounds, paper.regular_scale, paper.lamb, paper.erase_scale, paper.preserve_scale) == (
        3,
        0.1,
        0.1,
        1.0,
        0.1,
    )
    assert (paper.start_lamb, paper.start_erase_scale, paper.start_preserve_scale) == (0.5, 1.0, None)
    assert (paper.guide, paper.preserve, paper.preserve_empty, paper.adv_span) == ("", "", True, "all")
    fast = make_config("rece", "fast")
    assert (fast.rounds, fast.regular_scale) == (1, 1e-3) and fast.lamb == paper.lamb
    assert make_config("rece", "fast", {"rounds": "2"}).rounds == 2
    pipe = tiny_sd_pipeline()
    kv = sum(p.module.weight.numel() for p in _points(adapter_for(pipe)))
    assert spec.trainable_parameters(pipe, paper) == kv
    assert main(["erase", "--help-method", "rece"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rece: RECE (Gong et al., ECCV 2024)") and out == method_help("rece") + "\n"
    assert "regular_scale" in out and "paper=0.1  fast=0.001" in out


# ---- the closed forms ------------------------------------------------------------------------


def test_step_a_on_random_matrices_zero_gradient_and_the_limits():
    """Spec test (1): c' = M c has zero gradient of its objective; W = W0 and lambda_r -> 0 gives
    c' = c; lambda_r -> inf gives c' -> 0."""
    g = torch.Generator().manual_seed(0)
    w0s = [torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [w + 0.3 * torch.randn(12, 8, generator=g, dtype=torch.float64) for w in w0s]
    c = torch.randn(5, 8, generator=g, dtype=torch.float64)
    m, residual = regeneration_map(ws, w0s, 0.1)
    assert residual < 1e-12
    x = (c @ m.T).requires_grad_(True)
    objective = sum(((x @ w.T - c @ w0.T) ** 2).sum() for w, w0 in zip(ws, w0s)) + 0.1 * (x**2).sum()
    (grad,) = torch.autograd.grad(objective, x)
    assert grad.abs().max() < 1e-10
    torch.testing.assert_close(c @ regeneration_map(w0s, w0s, 1e-12)[0].T, c)
    assert (c @ regeneration_map(ws, w0s, 1e12)[0].T).abs().max() < 1e-9


def test_step_b_on_random_matrices_maps_the_rows_onto_their_targets():
    """Spec test (2): with preserve_scale 0, lamb -> 0 and independent rows, W' c'_j = W g_j; the
    normal equations hold for any weights."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    c, guide, r = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (5, 5, 3))
    new, residual = closed_form(w, 1e-9, 1.0, c.T @ c, guide.T @ c, 0.0, r.T @ r)
    torch.testing.assert_close(c @ new.T, guide @ w.T, atol=1e-6, rtol=1e-6)
    new, residual = closed_form(w, 0.3, 2.0, c.T @ c, guide.T @ c, 0.5, r.T @ r)
    grad = 0.3 * (new - w) + 2.0 * (c @ new.T - guide @ w.T).T @ c + 0.5 * (r @ new.T - r @ w.T).T @ r
    assert residual < 1e-12 and grad.abs().max() < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_every_solve_satisfies_its_normal_equations(family):
    """On the tiny model: each round's weights solve step B's normal equations given step A's c'
    (both written out here from the projections' own inputs; up to the float32 the deltas are
    stored in), the recorded float64 residuals are ~0, and only the k/v projections change
    (spec test 4)."""
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    fits = [_fit(pipe, rounds=k, preserve="dog") for k in range(3)]  # the rounds are deterministic prefixes
    assert {k[len("delta.") :] for k in fits[-1].tensors} == {p.name + ".weight" for p in _points(adapter)}
    assert fits[-1].metrics["start"]["normal_residual"] < 1e-10
    assert all(r["normal_residual"] < 1e-10 for r in fits[-1].metrics["rounds"])
    records = _inputs(adapter, ["car", "", "dog", ""])  # erased, guide, retained
    groups = _groups(adapter, records)
    assert fits[-1].hyperparameters["input_groups"] == len(groups) == (1 if family == "sd" else 2)
    base = _weights(adapter)
    for before, after in zip(fits, fits[1:]):
        w_before, w_after = _weights(adapter, before), _weights(adapter, after)
        for group in groups:
            x = records[group[0]]
            derived = _derive([w_before[n] for n in group], [base[n] for n in group], x[0], CONFIG.regular_scale)
            retained = torch.cat([x[2], x[3]])  # adv_span "all": every row of "dog" and of ""
            eye = torch.eye(x.shape[-1], dtype=x.dtype)
            rhs = CONFIG.lamb * eye + CONFIG.erase_scale * derived.T @ derived
            rhs = rhs + CONFIG.preserve_scale * retained.T @ retained
            for n in group:  # W' rhs = lamb W + s_e sum W g c'^T + s_p sum W r r^T (deltas stored in float32)
                w = w_before[n]
                lhs = CONFIG.lamb * w + CONFIG.erase_scale * (x[1] @ w.T).T @ derived
                lhs = lhs + CONFIG.preserve_scale * (retained @ w.T).T @ retained
                assert (w_after[n] @ rhs - lhs).norm() < 1e-5 * lhs.norm()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_start_is_uce(family):
    """rounds 0 is the UCE edit the release starts from: to-end rows onto the empty guide, lamb 0.5,
    the same as erasekit's uce with token_span to-end (to float64 rounding); the retained empty prompt
    is the release's extra."""
    pipe = BUILDERS[family]()
    start = _fit(pipe, rounds=0, preserve_empty=False)
    ref = uce.fit(pipe, "car", UCEConfig(token_span="to-end", samples=1), progress=False)
    assert start.tensors.keys() == ref.tensors.keys()
    # The same float64 solve along two code paths: bit for bit on most CPUs; on some (an AMD EPYC
    # here) the BLAS kernels round the last bit differently (1.4e-14 of 0.19). Any real
    # difference between the two edits is many orders above this bound.
    for k in ref.tensors:
        assert (start.tensors[k] - ref.tensors[k]).abs().max() <= 1e-12 * ref.tensors[k].abs().max(), k
    with_empty = _fit(pipe, rounds=0)
    assert with_empty.hyperparameters["start_preserve_scale_used"] == 1.0  # max(0.1, 1 / len([""]))
    assert not torch.equal(next(iter(with_empty.tensors.values())), next(iter(ref.tensors.values())))


# ---- the derived embedding -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_derived_embedding_still_works_until_a_round_erases_it(family):
    """On the UCE-edited model c' reproduces the original model's keys and values for the concept
    better than the concept's own embedding does; a round that adds it to the erased set maps
    its projections onto the guide's, and it then regenerates the concept worse."""
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    records = _inputs(adapter, ["car", ""])
    base, start = _weights(adapter), _weights(adapter, _fit(pipe, rounds=0))
    strong = _weights(adapter, _fit(pipe, rounds=1, erase_scale=1e6, preserve_scale=0.0))  # the same start
    for group in _groups(adapter, records):
        x = records[group[0]]
        w0s, w1s, w2s = ([w[n] for n in group] for w in (base, start, strong))
        derived = _derive(w1s, w0s, x[0], CONFIG.regular_scale)
        regen, regen_c = _regen(w1s, w0s, derived, x[0]), _regen(w1s, w0s, x[0], x[0])
        lam = CONFIG.regular_scale  # c' minimises regen + lam ||x||^2: no x does better, c included
        assert regen + lam * float(derived.norm()) ** 2 <= regen_c + lam * float(x[0].norm()) ** 2
        assert regen < 0.95 * regen_c
        for w1, w2 in zip(w1s, w2s):
            target = x[1] @ w1.T  # the guide's projections on the model the round starts from
            before, after = (derived @ w1.T - target).norm(), (derived @ w2.T - target).norm()
            assert after < 0.05 * before
        assert _regen(w2s, w0s, derived, x[0]) > 1.25 * regen  # it no longer regenerates the concept as well


def test_the_regeneration_residual_grows_round_over_round():
    """Spec test (3) on SD: the best regeneration the edited model allows gets worse each round;
    the recorded per-round figures are those of the derived rows."""
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    edit = _fit(pipe, rounds=3)
    rounds = edit.metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["seconds"] >= 0 for r in rounds)
    residuals = [r["regeneration_residual"] for r in rounds]
    assert residuals[0] < residuals[1] < residuals[2]
    assert all(r["regeneration_residual"] < r["concept_residual"] for r in rounds)
    x = _inputs(adapter, ["car"])
    (group,) = _groups(adapter, x)
    rows = x[group[0]][0]
    base, start = _weights(adapter), _weights(adapter, _fit(pipe, rounds=0))
    ws, w0s = [start[n] for n in group], [base[n] for n in group]
    derived = _derive(ws, w0s, rows, CONFIG.regular_scale)
    n = rows.shape[0]
    assert rounds[0]["regeneration_residual"] == pytest.approx(_regen(ws, w0s, derived, rows) / n, rel=1e-6)
    assert rounds[0]["embedding_norm"] == pytest.approx(float(derived.norm()) / n**0.5, rel=1e-6)
    assert rounds[0]["concept_norm"] == pytest.approx(float(rows.norm()) / n**0.5, rel=1e-6)


# ---- preservation and the regulariser --------------------------------------------------------


def _token_change(adapter, edit, prompts):
    """Per prompt: ||delta x|| / ||W0 x|| over every k/v projection, x its last token's input."""
    records, base = _inputs(adapter, prompts), _weights(adapter)
    out = []
    for i, prompt in enumerate(prompts):
        j = adapter.token_indices(prompt, prompt)[-1]
        num = den = 0.0
        for p in _points(adapter):
            x = records[p.name][i, j]
            num += float(((edit.tensors[f"delta.{p.name}.weight"].double() @ x) ** 2).sum())
            den += float(((base[p.name] @ x) ** 2).sum())
        out.append((num / den) ** 0.5)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_retained_concepts_keep_their_projections(family):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    scales = {"preserve_scale": 10.0, "start_preserve_scale": 10.0}
    kept = _token_change(adapter, _fit(pipe, preserve="dog; cat", **scales), ["car", "dog", "cat"])
    loose = _token_change(adapter, _fit(pipe), ["car", "dog", "cat"])
    assert kept[0] > 0.5  # the erased concept's projections moved
    assert max(kept[1:]) < 0.15 and max(kept[1:]) < 0.2 * kept[0]
    assert all(k < 0.3 * x for k, x in zip(kept[1:], loose[1:]))  # and without the retain list they move


@pytest.mark.parametrize("family", FAMILIES)
def test_the_regulariser_shrinks_the_derived_embedding(family):
    """lambda_r pulls c' towards 0: its norm falls and its regeneration residual grows with
    regular_scale; at a huge scale c' vanishes and the rounds change nothing."""
    pipe = BUILDERS[family]()
    norms, residuals = [], []
    for scale in (1e-3, 1e-1, 1e1):
        (r,) = _fit(pipe, rounds=1, regular_scale=scale).metrics["rounds"]
        norms.append(r["embedding_norm"])
        residuals.append(r["regeneration_residual"])
    assert norms[0] > norms[1] > norms[2] and residuals[0] < residuals[1] < residuals[2]
    start, off = _fit(pipe, rounds=0), _fit(pipe, rounds=2, regular_scale=1e12)
    assert off.metrics["rounds"][0]["embedding_norm"] < 1e-8
    for k, v in start.tensors.items():
        torch.testing.assert_close(off.tensors[k], v, atol=1e-6, rtol=0)


# ---- the Edit: deterministic, applies and comes off bit for bit ------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_and_applies_and_removes_bit_for_bit(family, tmp_path):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    g = torch.Generator().manual_seed(0)
    x, t = adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)
    cond = adapter.encode(["a photo of a car"])
    state = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    with torch.no_grad():
        base = adapter.predict(x, t, cond)
    edit, again = _fit(pipe, "car; dog"), _fit(pipe, "car; dog")
    assert edit.kind == "weight_delta" and edit.method == "rece" and edit.concepts == ["car", "dog"]
    assert edit.hyperparameters["erase_prompts"] == ["car", "dog"] and edit.hyperparameters["rounds"] == 3
    assert edit.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(edit.tensors[k], again.tensors[k]) for k in edit.tensors)
    assert all(torch.equal(p, state[n]) for n, p in adapter.denoiser.named_parameters())  # fit leaves it be
    apply(pipe, edit)
    with torch.no_grad():
        edited = adapter.predict(x, t, cond)
    assert (edited - base).abs().max() > 1e-4
    remove(pipe, edit)
    assert all(torch.equal(p, state[n]) for n, p in adapter.denoiser.named_parameters())
    edit.save(tmp_path / "edit")
    loaded = load_edit(tmp_path / "edit")
    assert loaded.metrics["rounds"] == edit.metrics["rounds"]
    apply(pipe, loaded)
    with torch.no_grad():
        assert torch.equal(adapter.predict(x, t, cond), edited)
    remove(pipe, loaded)
    with torch.no_grad():
        assert torch.equal(adapter.predict(x, t, cond), base)
    if family == "sd":  # deltas from the original weights: the merged export is W0 + delta
        folder = export_merged(pipe, edit, tmp_path / "merged")
        merged = type(adapter.denoiser).from_pretrained(folder).state_dict()
        for k, v in edit.tensors.items():
            name = k[len("delta.") :]
            torch.testing.assert_close(merged[name], state[name] + v)


# ---- errors ----------------------------------------------------------------------------------


def test_errors_are_one_line_as_uce_gives_them(tmp_path, monkeypatch, capsys, caplog):
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="car"):
        _fit(pipe, templates="a photo of a dog")
    with pytest.raises(ValueError, match="no concept"):
        _fit(pipe, " ; ")
    for key, value, words in [
        ("regular_scale", "0", "rece: regular_scale must be a finite number > 0, got 0.0"),
        ("rounds", "-1", "rece: rounds must be an integer >= 0, got -1"),
        ("adv_span", "some", "rece: adv_span must be one of 'all', 'to-end', got 'some'"),
        ("start_preserve_scale", "nan", "rece: start_preserve_scale must be a finite number >= 0, or none"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
            make_config("rece", "paper", {key: value})
    assert make_config("rece", "paper", {"start_preserve_scale": "none"}).start_preserve_scale is None

    import erasekit.models

    def no_pipeline(*a, **k):
        raise AssertionError("loaded the pipeline before refusing the setting")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.models, "load_pipeline", no_pipeline)
    argv = ["erase", "--method", "rece", "--model", "toy:sd", "--concept", "car", "--out", "E"]
    assert main([*argv, "--set", "lamb=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "erasekit erase: error: rece: lamb must be a finite number > 0, got 0.0"
    assert not (tmp_path / "E").exists()

    with caplog.at_level(logging.WARNING, logger="erasekit"):  # a word the tokenizer spells out: a warning
        erase(pipe, "zebra", "rece", dataclasses.replace(CONFIG, rounds=1), progress=False)
    assert "splits 'zebra' into" in caplog.text
