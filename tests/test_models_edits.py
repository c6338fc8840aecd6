"""Attachment points, output edits and the edits on/off switch (incl. peft LoRA)."""

import pytest
import torch
from peft import LoraConfig
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.models import FamilyAdapter, adapter_for, frozen

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}


@pytest.fixture(params=["sd", "flux"])
def fresh(request):
    """A private tiny pipeline's adapter (these tests modify the model)."""
    return adapter_for(BUILDERS[request.param]())


def _predict(adapter, inputs):
    with torch.no_grad():
        return adapter.predict(*inputs)


def test_attachment_points(fresh):
    out_points = fresh.attachment_points("attn_out")
    proj_points = fresh.attachment_points("text_proj")
    modules = dict(fresh.denoiser.named_modules())
    for p in out_points + proj_points:
        assert modules[p.name] is p.module and p.width > 0
    assert all(p.in_features for p in proj_points)
    if fresh.family == "sd":
        assert len(out_points) == 7 and len(proj_points) == 14
        assert {p.name.rsplit(".", 1)[1] for p in proj_points} == {"to_k", "to_v"}
        assert proj_points[0].in_features == 32  # the text width
    else:
        assert [p.name for p in out_points] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
        assert len(proj_points) == 6
    with pytest.raises(ValueError, match="attn_out"):
        fresh.attachment_points("mlp")


def test_output_edit_and_edits_disabled(fresh, make_inputs):
    inputs = make_inputs(fresh)
    base = _predict(fresh, inputs)
    point = fresh.attachment_points("attn_out")[0]
    calls = []

    def shift(h):
        calls.append(h.shape)
        assert h.shape[-1] == point.width or h.shape[1] == point.width
        return h + 0.5

    handle = fresh.add_output_edit(point, shift)
    edited = _predict(fresh, inputs)
    assert (edited - base).abs().max() > 1e-4 and calls
    with fresh.edits_disabled():
        torch.testing.assert_close(_predict(fresh, inputs), base, rtol=0, atol=0)
        with fresh.edits_disabled():  # re-entrant
            torch.testing.assert_close(_predict(fresh, inputs), base, rtol=0, atol=0)
        torch.testing.assert_close(_predict(fresh, inputs), base, rtol=0, atol=0)
    torch.testing.assert_close(_predict(fresh, inputs), edited, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        with fresh.edits_disabled():
            raise RuntimeError("teacher pass failed")
    assert fresh.edits_enabled
    torch.testing.assert_close(_predict(fresh, inputs), edited, rtol=0, atol=0)
    # Every adapter over the same denoiser shares the switch.
    other = FamilyAdapter.for_denoiser(fresh.denoiser)
    with other.edits_disabled():
        assert not fresh.edits_enabled
        torch.testing.assert_close(_predict(fresh, inputs), base, rtol=0, atol=0)
    handle.remove()
    torch.testing.assert_close(_predict(fresh, inputs), base, rtol=0, atol=0)


def test_extra_attention_outputs_are_edited_on_the_image_tokens_only(fresh, make_inputs):
    extra = fresh.attachment_points("attn_out_extra")
    if fresh.family == "sd":
        assert extra == []  # every attn2 is an "attn_out" point already
        return
    modules = dict(fresh.denoiser.named_modules())
    assert [p.name for p in extra] == [
        f"single_transformer_blocks.{i}.attn" for i in range(len(fresh.denoiser.single_transformer_blocks))
    ]
    assert all(modules[p.name] is p.module for p in extra)
    inputs = make_inputs(fresh)
    base = _predict(fresh, inputs)
    n_image = inputs[0].shape[1]
    text_part = {}
    seen = []
    # A hook registered before the edit's sees the attention output unchanged, to compare with.
    probe = extra[0].module.register_forward_hook(lambda m, a, out: text_part.update(before=out.clone()))

    def shift(h):
        seen.append(h.shape)
        return h + 0.5

    handle = fresh.add_output_edit(extra[0], shift)
    after = extra[0].module.register_forward_hook(lambda m, a, out: text_part.update(after=out.clone()))
    edited = _predict(fresh, inputs)
    assert seen == [(1, n_image, extra[0].width)]
    n_text = text_part["before"].shape[1] - n_image
    assert torch.equal(text_part["after"][:, :n_text], text_part["before"][:, :n_text])
    torch.testing.assert_close(text_part["after"][:, n_text:], text_part["before"][:, n_text:] + 0.5)
    assert (edited - base).abs().max() > 1e-4
    for h in (handle, probe, after):
        h.remove()
    torch.testing.assert_close(_predict(fresh, inputs), base, rtol=0, atol=0)


def test_text_proj_edit(fresh, make_inputs):
    inputs = make_inputs(fresh)
    base = _predict(fresh, inputs)
    point = fresh.attachment_points("text_proj")[1]
    handle = fresh.add_output_edit(point, lambda h: h * 0.0)
    assert (_predict(fresh, inputs) - base).abs().max() > 1e-5
    handle.remove()


def test_lora_is_switched_off_and_back(fresh, make_inputs):
    inputs = make_inputs(fresh)
    base = _predict(fresh, inputs)
    targets = [p.name for p in fresh.attachment_points("text_proj")]
    fresh.denoiser.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets), adapter_name="erase"
    )
    with torch.no_grad():
        for name, param in fresh.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora_params = [p for n, p in fresh.denoiser.named_parameters() if "lora_" in n]
    for p in lora_params[::2]:
        p.requires_grad_(False)  # a mixed state that must survive the switch
    flags = [p.requires_grad for p in lora_params]

    with_lora = _predict(fresh, inputs)
    assert (with_lora - base).abs().max() > 1e-4
    with fresh.edits_disabled():
        torch.testing.assert_close(_predict(fresh, inputs), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(_predict(fresh, inputs), with_lora, rtol=0, atol=0)
    assert [p.requires_grad for p in lora_params] == flags


def test_registered_switch(fresh):
    class Switch:
        def __init__(self):
            self.enabled = True

        def enable(self):
            self.enabled = True

        def disable(self):
            self.enabled = False

    on, off = Switch(), Switch()
    off.disable()
    handles = [fresh.register_switch(on), fresh.register_switch(off)]
    with fresh.edits_disabled():
        assert not on.enabled and not off.enabled
    assert on.enabled and not off.enabled  # previous states restored
    handles[0].remove()
    with fresh.edits_disabled():
        assert on.enabled
    with pytest.raises(TypeError):
        fresh.register_switch(object())


def test_frozen_restores_each_flag_even_on_error():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.bias.requires_grad_(False)
    with pytest.raises(RuntimeError):
        with frozen(a, b, "not a module"):
            assert not any(p.requires_grad for p in [*a.parameters(), *b.parameters()])
            raise RuntimeError
    assert [p.requires_grad for p in [*a.parameters(), *b.parameters()]] == [True, True, True, False]
