"""The family-independent surface that every erasure method is written against.

A :class:`FamilyAdapter` wraps one diffusers pipeline and hides what differs between model
families (latent layout, timestep units, text encoders, attention modules). Methods only ever
talk to an adapter; they never branch on the family. Text conditioning and token spans live in
:mod:`.conditioning`, attention probes in :mod:`.probes`, the memory features in :mod:`.memory`;
the adapter's methods of the same names open them.
"""

from __future__ import annotations

import inspect
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import UserError
from . import memory
from .conditioning import Conditioning, find_token_spans, phrase_pieces
from .probes import AttentionProbe, probing

# Keys an ``erasekit_defaults.json`` may hold (see :meth:`FamilyAdapter._apply_defaults`).
DEFAULT_KEYS = (
    "max_sequence_length",
    "num_inference_steps",
    "guidance",
    "height",
    "width",
    "rollout_steps",
    "rollout_guidance",
)


class UnsupportedPipelineError(UserError, ValueError):
    """The pipeline (or a pipeline folder) belongs to a family erasekit does not support."""


# --------------------------------------------------------------------------------------------
# Attachment points
# --------------------------------------------------------------------------------------------


@dataclass
class AttachmentPoint:
    """A place in the denoiser where a method attaches trainable parts or edits weights.

    ``name``: full module name inside the denoiser. ``width``: feature width of the edited
    tensor (attn_out: output channels; text_proj: the Linear's out_features).
    ``in_features``: text_proj only, the Linear's in_features.
    ``role``: text_proj only, which attention input the Linear makes: "q", "k" or "v".
    """

    name: str
    module: nn.Module
    width: int
    in_features: int | None = None
    role: str | None = None


def base_linear(module: nn.Module) -> nn.Module:
    """The Linear itself: the one peft wraps when it has wrapped ``module``, else ``module``."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def plain_parameter_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name on the plain model: where peft has wrapped a layer (a user's LoRA
    attached), the ``.base_layer.`` it inserts is left out, so an edit's tensor names fit the model
    without it."""
    return {id(p): n.replace(".base_layer.", ".") for n, p in module.named_parameters()}


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, also when peft has wrapped it."""
    base = base_linear(module)
    return base.in_features, base.out_features


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No parameter of ``modules`` requires grad inside the block; each one's flag is restored
    after it (also on error). Non-module arguments are ignored."""
    params = [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


EDIT_STACK_KEY = "_erasekit_edits"  # the one attribute erasekit keeps on a denoiser


class EditStack:
    """Everything erasekit has attached to one denoiser, and the on/off switch of it all.

    There is one per denoiser module, at ``denoiser.__dict__[EDIT_STACK_KEY]`` (read it with
    :attr:`FamilyAdapter.edit_stack`), so every adapter over the same denoiser (adapter_for,
    for_denoiser) sees the same edits and the same switch. It is a plain container: the edit
    kinds of :mod:`erasekit.edits` fill it.

    - ``attached``: edit id -> attachment (``erasekit.edits.apply`` / ``remove``);
    - ``kinds``: edit-kind name -> that kind's shared state on this denoiser (e.g. the output
      adapter's modules per point, the weight-delta bank); a kind deletes its entry when empty;
    - ``depth``, ``switches``, ``undo``: :meth:`FamilyAdapter.edits_disabled`.
    """

    def __init__(self):
        self.attached: dict[str, Any] = {}
        self.kinds: dict[str, Any] = {}
        self.depth = 0  # > 0 while edits_disabled() is active
        self.switches: list[Any] = []
        self.undo: list[Callable[[], None]] = []


class _Handle:
    def __init__(self, remove: Callable[[], None]):
        self._remove = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


class FamilyAdapter:
    """Uniform surface over one model family. See the module docstrings of the subclasses.

    Units: latents are in the denoiser's native input layout (SD (B, C, h, w); Flux packed
    (B, N, C*4)); timesteps ``t`` are 1-D (B,) tensors in the scheduler's own units
    (SD: integer DDPM steps 0..999; Flux: sigma*1000).
    """

    family: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # class names of the diffusers pipelines it drives
    denoiser_names: ClassVar[tuple[str, ...]] = ()  # class names of the denoisers it drives
    supported: ClassVar[str] = ""  # what it supports, in words, for the unsupported-pipeline message
    prediction: str
    default_steps: int
    default_guidance: float
    # Every subclass that names a family, in definition (import) order: the families erasekit supports.
    _registry: ClassVar[list[type[FamilyAdapter]]] = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.family:
            FamilyAdapter._registry.append(cls)

    def __init__(self, pipe, denoiser: nn.Module | None = None, defaults: dict | None = None):
        self.pipe = pipe
        self._denoiser = denoiser
        self._setup()
        if defaults is None and pipe is not None:
            defaults = getattr(pipe, "erasekit_defaults", None)
        self._apply_defaults(defaults or {})

    # ---- construction --------------------------------------------------------------------

    @staticmethod
    def registered() -> list[type[FamilyAdapter]]:
        """The adapter classes of every supported family, in the order they are matched."""
        return list(FamilyAdapter._registry)

    @classmethod
    def pipeline_mismatch(cls, components: dict[str, str]) -> str | None:
        """Why a pipeline whose class is one of :attr:`pipeline_classes` is not this family after
        all (e.g. the wrong denoiser), judged from ``components`` (component name -> class name,
        empty slots left out) before any weights load; None when this adapter drives it."""
        raise NotImplementedError

    @classmethod
    def loading_kwargs(cls, components: dict[str, str | None], kwargs: dict) -> dict:
        """The ``from_pretrained`` keyword arguments to load this family's pipeline with, from
        the caller's ``kwargs`` and the pipeline's ``components`` (name -> class name, None for
        an empty slot). Default: the caller's, unchanged."""
        return kwargs

    @classmethod
    def matches_denoiser(cls, denoiser: nn.Module) -> bool:
        """Whether this family drives ``denoiser``."""
        raise NotImplementedError

    @classmethod
    def for_denoiser(cls, denoiser: nn.Module) -> FamilyAdapter:
        """An adapter over a bare denoiser (no pipeline): for structure queries such as
        attention_layers, attachment_points, probes and edits, e.g. on a meta-device model.
        Methods that need text encoders, the VAE or the scheduler raise."""
        if cls is FamilyAdapter:
            for sub in FamilyAdapter._registry:
                if sub.matches_denoiser(denoiser):
                    return sub(None, denoiser=denoiser)
            raise UnsupportedPipelineError(
                f"no erasekit adapter for a {type(denoiser).__name__}; supported denoisers: "
                + ", ".join(sorted({n for s in FamilyAdapter._registry for n in s.denoiser_names})),
            )
        return cls(None, denoiser=denoiser)

    def _setup(self) -> None:
        """Family-specific initialisation (prediction type, scheduler copies, defaults)."""

    def _apply_defaults(self, defaults: dict) -> None:
        """Apply an ``erasekit_defaults.json`` dict on top of the family defaults.

        ``num_inference_steps`` / ``guidance`` set both the generation defaults and the rollout
        defaults (``default_steps`` / ``default_guidance``); ``rollout_steps`` /
        ``rollout_guidance`` override the rollout ones alone. ``height``/``width`` are pixels.
        """
        unknown = set(defaults) - set(DEFAULT_KEYS)
        if unknown:  # a newer file or extra metadata: use what we know, say what we skip
            warnings.warn(
                f"ignoring unknown erasekit defaults {sorted(unknown)}; known: {list(DEFAULT_KEYS)}",
                stacklevel=3,
            )
        self.defaults = dict(defaults)
        if "num_inference_steps" in defaults:
            self.generation_steps = self.default_steps = int(defaults["num_inference_steps"])
        if "guidance" in defaults:
            self.generation_guidance = self.default_guidance = float(defaults["guidance"])
        if "rollout_steps" in defaults:
            self.default_steps = int(defaults["rollout_steps"])
        if "rollout_guidance" in defaults:
            self.default_guidance = float(defaults["rollout_guidance"])
        if "height" in defaults:
            self.default_height = int(defaults["height"])
        if "width" in defaults:
            self.default_width = int(defaults["width"])
        if "max_sequence_length" in defaults:
            self.max_sequence_length = int(defaults["max_sequence_length"])

    # ---- common properties -----------------------------------------------------------------

    @property
    def denoiser(self) -> nn.Module:
        """pipe.unet or pipe.transformer (looked up live, so component swaps are seen)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def _require_pipe(self, what: str):
        if self.pipe is None:
            raise RuntimeError(f"{what} needs a full pipeline; this adapter wraps a bare denoiser")
        return self.pipe

    def _batch_t(self, t, batch: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must have shape ({batch},), got {tuple(t.shape)}")
        return t

    # ---- text ------------------------------------------------------------------------------

    def encode(self, prompts: list[str], grad: bool = False) -> Conditioning:
        """The prompts' Conditioning, as the pipeline encodes them; gradients flow only with ``grad``."""
        raise NotImplementedError

    def _main_tokenizer(self):
        """(tokenizer, max_length) used for the embeddings in Conditioning.embeds."""
        raise NotImplementedError

    def main_text_encoder(self) -> tuple[Any, nn.Module]:
        """(tokenizer, text encoder) behind Conditioning.embeds: for a prompt's ids (tokenized as
        :meth:`token_spans` does), ``encoder(input_ids)[0]`` is ``encode([prompt]).embeds``
        (before the cast to the denoiser's dtype). SD: the CLIP encoder; Flux: T5."""
        raise NotImplementedError

    def main_token_ids(self, prompts: Sequence[str]) -> Tensor:
        """(B, L) int64 ids the main text encoder reads for ``prompts``, tokenized as the
        pipeline and :meth:`token_spans` tokenize them (special tokens, padded to L, truncated):
        ``main_text_encoder()[1](ids)[0]`` is ``encode(prompts).embeds``, on the CPU."""
        tokenizer, max_length = self._main_tokenizer()
        enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)
        return torch.tensor(enc["input_ids"], dtype=torch.long)

    def token_spans(self, prompt: str, phrase: str) -> list[list[int]]:
        """Every contiguous run of ``phrase``'s tokens in ``prompt`` (positions index
        Conditioning.embeds along L; sub-word pieces included; BOS/EOS/pad never included).
        Phrase absent or truncated away -> ValueError naming both."""
        tokenizer, max_length = self._main_tokenizer()
        return find_token_spans(tokenizer, prompt, phrase, max_length)

    def unfamiliar_words(self, text: str) -> list[tuple[str, list[str]]]:
        """The words of ``text`` that the main tokenizer does not hold as words: (word, pieces) for
        each word it splits into unknown-token pieces (an emoji) or spells out, i.e. splits into
        more than two pieces of fewer than two characters each on average, word markers ("</w>",
        "▁") not counted. Text embeddings of such words carry little of what a reader means
        by them. The average, not the count: T5's SentencePiece splits words a model reads well
        into three pieces ("nudity" = ▁nu d ity) where CLIP's BPE uses two (nu dity</w>);
        "nudityx" is spelled out by both (nu d ity x</w>; ▁nu d ity x)."""
        tokenizer, _ = self._main_tokenizer()
        unknown = getattr(tokenizer, "unk_token", None)
        out = []
        for word in text.replace(";", " ").replace(",", " ").split():
            pieces = phrase_pieces(tokenizer, word)
            chars = sum(len(p.replace("</w>", "").replace("\u2581", "")) for p in pieces)
            spelled_out = len(pieces) > 2 and chars < 2 * len(pieces)
            if spelled_out or (unknown is not None and unknown in pieces):
                out.append((word, pieces))
        return out

    def token_indices(self, prompt: str, phrase: str) -> list[int]:
        """Flattened :meth:`token_spans`."""
        return [i for span in self.token_spans(prompt, phrase) for i in span]

    # ---- memory ----------------------------------------------------------------------------

    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoder modules (SD: CLIP; Flux: CLIP and T5)."""
        raise NotImplementedError

    def _text_device(self) -> torch.device:
        """Where the text encoders run; :meth:`encode` raises while they are released."""
        return memory.text_device(self)

    def text_encoders_released(self, park: str | torch.device = "cpu") -> AbstractContextManager[None]:
        """Train without the text encoders in accelerator memory: inside, they are parked on
        ``park`` and :meth:`encode` raises, so a method encodes every prompt it needs BEFORE
        entering. They go back to their devices on exit. FLUX.1-dev's T5-XXL alone holds
        9.5 GB in bf16; on a CPU-only run parking is a no-op but the encode guard still holds."""
        return memory.text_encoders_released(self, park)

    def checkpoint_units(self) -> list[str]:
        """Names of the denoiser blocks :meth:`gradient_checkpointing` can recompute."""
        raise NotImplementedError

    def gradient_checkpointing(self, keep: Sequence[str] = ()) -> AbstractContextManager[None]:
        """Inside, every denoiser block of :meth:`checkpoint_units` that holds none of the layers
        in ``keep`` stores only its inputs in forward and recomputes its activations in
        backward (``torch.utils.checkpoint``, non-reentrant): peak memory of one block's
        activations instead of all of them, for about one more forward pass of compute.
        Blocks with a layer in ``keep`` run as usual: pass the layers a method probes with
        gradient, whose recorded maps must come from the one forward pass. The edits' state
        (:meth:`edits_disabled`) must be the same at backward as at forward."""
        return memory.gradient_checkpointing(self, keep)

    # ---- denoising -------------------------------------------------------------------------

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        raise NotImplementedError

    def sample_noise(self, batch: int, height=None, width=None, generator=None) -> Tensor:
        raise NotImplementedError

    def predict(self, latents: Tensor, t, cond: Conditioning, guidance: float | None = None) -> Tensor:
        raise NotImplementedError

    def guided_predict(self, latents: Tensor, t, cond: Conditioning, uncond: Conditioning, scale: float) -> Tensor:
        """Classifier-free guidance: uncond + scale * (cond - uncond), one batched pass.

        ``uncond`` may have batch 1 (broadcast to the batch of ``cond``).
        """
        if uncond is None:
            raise ValueError("classifier-free guidance needs an unconditional Conditioning")
        b = latents.shape[0]
        t = self._batch_t(t, b)
        both = Conditioning.cat([uncond.expand_to(b), cond.expand_to(b)])
        out = self.predict(torch.cat([latents, latents]), torch.cat([t, t]), both)
        out_u, out_c = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    def _make_sampler(self, num_steps: int, latents: Tensor):
        """A fresh scheduler with timesteps set for ``num_steps`` steps from ``latents``."""
        raise NotImplementedError

    def rollout(
        self,
        cond: Conditioning,
        uncond: Conditioning | None,
        t_enc: int,
        num_steps: int | None = None,
        guidance: float | None = None,
        generator=None,
        height: int | None = None,
        width: int | None = None,
        latents: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """ESD partial rollout with the CURRENT (edited) model, no grad.

        Draws noise (or takes ``latents``, initial noise in native layout), scales it by the
        scheduler's init_noise_sigma, and runs ``t_enc`` of ``num_steps`` sampler steps with
        :meth:`guided_predict` at ``guidance``. A fresh scheduler is built every call (no state
        carried between rollouts). Returns (x_t, t): x_t in native layout and t (B,) the
        training timestep x_t sits at (= the sampler's timesteps[t_enc]).
        """
        states = self._rollout_states(cond, uncond, t_enc, num_steps, guidance, generator, height, width, latents)
        x, t = deque(states, maxlen=1)[0]  # only the last state is wanted
        return x, t.expand(x.shape[0]).to(self.device)

    def rollout_trajectory(
        self,
        cond: Conditioning,
        uncond: Conditioning | None,
        stop: int,
        num_steps: int | None = None,
        guidance: float | None = None,
        generator=None,
        height: int | None = None,
        width: int | None = None,
        latents: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Every state of one partial rollout, no grad: what :meth:`rollout` returns for each
        t_enc in [0, stop], from one noise draw and ``stop`` guided sampler steps.

        Returns (xs, ts): xs (stop + 1, B, *latent) with ``xs[k]`` = ``rollout(..., t_enc=k)[0]``
        for the same noise (bit for bit), and ts (stop + 1,) the sampler's timesteps[0..stop].
        """
        xs, ts = [], []
        for x, t in self._rollout_states(cond, uncond, stop, num_steps, guidance, generator, height, width, latents):
            xs.append(x)
            ts.append(t)
        return torch.stack(xs), torch.stack(ts).to(self.device)

    def _rollout_states(
        self, cond, uncond, stop, num_steps, guidance, generator, height, width, latents
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields (x after k sampler steps, timesteps[k]) for k = 0..stop (the ESD rollout)."""
        num_steps = int(num_steps or self.default_steps)
        if not 0 <= stop < num_steps:
            raise ValueError(f"t_enc must be in [0, {num_steps}), got {stop}")
        guidance = self.default_guidance if guidance is None else guidance
        if latents is None:
            latents = self.sample_noise(cond.batch_size, height, width, generator)
        b = latents.shape[0]
        sampler = self._make_sampler(num_steps, latents)
        x = latents.to(self.device, self.dtype) * getattr(sampler, "init_noise_sigma", 1.0)
        for t in sampler.timesteps[:stop]:
            yield x, t
            with torch.no_grad():  # not around the yield: the caller's grad mode stays its own
                model_in = sampler.scale_model_input(x, t) if hasattr(sampler, "scale_model_input") else x
                out = self.guided_predict(model_in, t.expand(b), cond, uncond, guidance)
                x = sampler.step(out, t, x, return_dict=False)[0]
        yield x, sampler.timesteps[stop]

    def sample_timesteps(self, batch: int, generator=None) -> Tensor:
        raise NotImplementedError

    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Conditioning, float | None]:
        """(latents, t, cond, guidance) of a denoiser forward call, as a forward hook on
        :attr:`denoiser` sees it (e.g. a call by the stock pipeline), in this adapter's units:
        ``predict(latents, t, cond, guidance)`` repeats the call. ``t`` has shape (B,)."""
        raise NotImplementedError

    #: The denoiser forward's parameters that take Conditioning.embeds and Conditioning.pooled
    #: (None: the family has no pooled text input), for :meth:`with_call_conditioning`.
    conditioning_parameters: ClassVar[tuple[str, str | None]] = ("encoder_hidden_states", None)

    def with_call_conditioning(self, args: tuple, kwargs: dict, cond: Conditioning) -> tuple[tuple, dict]:
        """The (args, kwargs) of a denoiser forward call, as a forward pre-hook on
        :attr:`denoiser` sees them, with the text conditioning replaced by ``cond`` (same batch
        and layout as :meth:`call_inputs` gives it): the inverse of ``call_inputs``' third
        element. A pooled tensor of ``cond`` is dropped for a family without one."""
        names = list(inspect.signature(self.denoiser.forward).parameters)
        args, kwargs = list(args), dict(kwargs)
        embeds_name, pooled_name = self.conditioning_parameters
        for name, value in ((embeds_name, cond.embeds), (pooled_name, cond.pooled)):
            if name is None or value is None:
                continue
            position = names.index(name)
            if name not in kwargs and position < len(args):
                args[position] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def _forward_arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The denoiser forward's arguments by parameter name."""
        return inspect.signature(self.denoiser.forward).bind_partial(*args, **kwargs).arguments

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    # ---- images ----------------------------------------------------------------------------

    def encode_images(self, images: Tensor, generator=None) -> Tensor:
        raise NotImplementedError

    def decode_latents(self, latents: Tensor, height=None, width=None) -> Tensor:
        raise NotImplementedError

    def generate(
        self, prompts, seeds, steps=None, guidance=None, height=None, width=None, negative_prompt: str = ""
    ) -> Tensor:
        raise NotImplementedError

    def generate_from_conditioning(
        self,
        cond: Conditioning,
        seeds,
        uncond: Conditioning | None = None,
        steps=None,
        guidance=None,
        height=None,
        width=None,
    ) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from ready text embeddings instead of prompts (e.g. an
        adversarial soft prompt), sampled exactly as :meth:`generate` samples."""
        raise NotImplementedError

    def _sample(self, pipe, seeds: Sequence[int], steps=None, height=None, width=None, **inputs) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from the stock ``pipe`` called with ``inputs`` (prompts or
        embeddings, guidance) at this adapter's sampling defaults, one CPU generator per image."""
        out = pipe(
            num_inference_steps=steps or self.generation_steps,
            height=height or self.default_height,
            width=width or self.default_width,
            generator=self._generators(seeds),
            output_type="pt",
            **inputs,
        )
        return out.images

    @staticmethod
    def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
        # CPU generators: the same seed gives the same noise on every device.
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    # ---- attention -------------------------------------------------------------------------

    def attention_layers(self) -> list[str]:
        raise NotImplementedError

    def middle_resolution_layers(self) -> list[str]:
        raise NotImplementedError

    def keyword_layers(self) -> list[str]:
        """Layers whose attention on a keyword's tokens methods read or suppress by default
        (EraseAnything's attention loss and features)."""
        raise NotImplementedError

    def _default_probe_layers(self) -> list[str]:
        raise NotImplementedError

    def _probe_modules(self, layers: list[str]) -> dict[str, nn.Module]:
        """layer name -> the attention module whose processor gets wrapped."""
        raise NotImplementedError

    def _make_recorder(self, probe: AttentionProbe, layer: str) -> Callable[..., None]:
        raise NotImplementedError

    def _capture_forward_inputs(self, probe: AttentionProbe, args: tuple, kwargs: dict) -> None:
        raise NotImplementedError

    def _layer_resolution(self, probe: AttentionProbe, layer: str) -> tuple[int, int]:
        raise NotImplementedError

    def probe(
        self,
        layers: list[str] | None = None,
        token_indices: list[int] | None = None,
        include_image_keys: bool = False,
        max_chunk_elements: int = 1 << 26,
    ) -> AbstractContextManager[AttentionProbe]:
        """Record attention of image queries over text keys while the context is open.

        ``layers``: names from :meth:`attention_layers` (default: all cross-attention / all
        dual-stream blocks). ``token_indices``: text columns to keep (default all).
        See :class:`AttentionProbe` for shapes. Outputs are unchanged (the stock processor
        computes them); the original processors are restored on exit, also on exceptions.
        """
        return probing(self, layers, token_indices, include_image_keys, max_chunk_elements)

    # ---- edits -----------------------------------------------------------------------------

    ATTACHMENT_KINDS: ClassVar[tuple[str, ...]] = ("attn_out", "attn_out_extra", "text_proj", "pooled_proj")

    def attachment_points(self, kind: str) -> list[AttachmentPoint]:
        """Where methods attach. "attn_out": cross/joint-attention outputs (image stream);
        "attn_out_extra": further attention outputs that mix text into the image, left out of
        "attn_out" (Flux: the single-stream blocks, whose output edits see the image tokens only;
        SD: none); "text_proj": the Linears that read the text (SD attn2.to_k/to_v; Flux
        add_q/k/v_proj); "pooled_proj": the Linears that read a pooled text embedding (Flux:
        time_text_embed.text_embedder.linear_1, role "pooled"; SD: none)."""
        if kind not in self.ATTACHMENT_KINDS:
            raise ValueError(f"unknown attachment kind {kind!r}; known kinds: {list(self.ATTACHMENT_KINDS)}")
        return self._attachment_points(kind)

    def _attachment_points(self, kind: str) -> list[AttachmentPoint]:
        raise NotImplementedError

    PARAMETER_GROUPS: ClassVar[tuple[str, ...]] = ("cross_attn", "non_cross_attn")

    def parameter_group(self, group: str) -> dict[str, nn.Parameter]:
        """The parameters of a fine-tuning group, by name: weights and biases of the denoiser's
        Linear and Conv2d layers (peft adapter layers excluded). "cross_attn": the layers that
        attend to the text (SD: every attn2; Flux: the text-stream projections of the
        dual-stream joint attention); "non_cross_attn": all the other ones. (ESD-x / ESD-u.)"""
        if group not in self.PARAMETER_GROUPS:
            raise ValueError(f"unknown parameter group {group!r}; known groups: {list(self.PARAMETER_GROUPS)}")
        inside = group == "cross_attn"
        params = {}
        for name, module in self.denoiser.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or ".lora_" in f".{name}":
                continue
            if self._is_cross_attn_layer(name) == inside:
                params.update({f"{name}.{n}": p for n, p in module.named_parameters(recurse=False)})
        return params

    def _is_cross_attn_layer(self, name: str) -> bool:
        """Whether the Linear/Conv2d layer ``name`` belongs to the "cross_attn" group."""
        raise NotImplementedError

    @property
    def edit_stack(self) -> EditStack:
        """The denoiser's :class:`EditStack` (created on first use)."""
        return self.denoiser.__dict__.setdefault(EDIT_STACK_KEY, EditStack())

    @property
    def edits_enabled(self) -> bool:
        """False while :meth:`edits_disabled` is active."""
        return self.edit_stack.depth == 0

    def add_output_edit(self, point: AttachmentPoint, fn: Callable[[Tensor], Tensor]):
        """Make the point's output h (image stream: element 0 when the module returns a tuple)
        become fn(h), e.g. h + E(h). Skipped while :meth:`edits_disabled` is active.
        Returns a handle with ``remove()``."""
        state = self.edit_stack

        def hook(_module, _args, output):
            if state.depth:
                return None
            if isinstance(output, tuple):
                return (fn(output[0]),) + tuple(output[1:])
            return fn(output)

        return point.module.register_forward_hook(hook)

    def skip_stages(self) -> int:
        """How many decoder stages read skip features from the encoder (SD: the UNet's up
        blocks); 0 for a family without skip connections (Flux). See :meth:`add_skip_edit`."""
        return 0

    def add_skip_edit(self, fn: Callable[[int, tuple[Tensor, ...]], tuple[Tensor, ...]]) -> _Handle:
        """Make the skip features that decoder stage ``s`` (0: the lowest resolution, first to
        run) reads, a tuple of (B, C, h, w) tensors, become ``fn(s, features)`` (same shapes).
        Skipped while :meth:`edits_disabled` is active. Returns a handle with ``remove()``.
        ValueError for a family without skip features (``skip_stages() == 0``)."""
        raise ValueError(f"the {self.family} family's denoiser has no decoder skip features (no UNet up blocks)")

    def register_switch(self, switch) -> _Handle:
        """Register an object with ``enable()`` / ``disable()`` (and optionally an ``enabled``
        attribute) that :meth:`edits_disabled` must switch off too. Returns a handle."""
        if not (callable(getattr(switch, "enable", None)) and callable(getattr(switch, "disable", None))):
            raise TypeError("a switch needs enable() and disable() methods")
        switches = self.edit_stack.switches
        switches.append(switch)
        return _Handle(lambda: switches.remove(switch) if switch in switches else None)

    @contextmanager
    def edits_disabled(self) -> Iterator[None]:
        """Switch off every attached edit: output edits, peft LoRA layers on the denoiser and
        registered switches, for frozen-teacher passes without a model copy. Re-entrant; the
        previous state (including adapter requires_grad flags) is restored on exit."""
        state = self.edit_stack
        if state.depth == 0:
            state.undo = self._disable_all(state)
        state.depth += 1
        try:
            yield
        finally:
            state.depth -= 1
            if state.depth == 0:
                undo, state.undo = state.undo, []
                for fn in reversed(undo):
                    fn()

    def _disable_all(self, state: EditStack) -> list[Callable[[], None]]:
        undo: list[Callable[[], None]] = []
        try:
            self._switch_off(state, undo)
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        return undo

    def _switch_off(self, state: EditStack, undo: list[Callable[[], None]]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft is slow to import

        for module in self.denoiser.modules():
            if isinstance(module, BaseTunerLayer) and not module.disable_adapters:
                grads = [
                    (p, p.requires_grad) for n in module.adapter_layer_names for p in getattr(module, n).parameters()
                ]
                module.enable_adapters(False)

                def restore(module=module, grads=grads):
                    module.enable_adapters(True)
                    for p, flag in grads:  # peft's enable_adapters resets requires_grad
                        p.requires_grad_(flag)

                undo.append(restore)
        for switch in list(state.switches):
            was_enabled = getattr(switch, "enabled", True)
            if was_enabled:
                switch.disable()
                undo.append(switch.enable)
