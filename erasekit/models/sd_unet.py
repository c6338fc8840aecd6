"""Adapter for Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``, a UNet2DConditionModel).

Latents: (B, 4, H/8, W/8), already multiplied by the VAE scaling factor. Timesteps: integer DDPM
steps 0..num_train_timesteps-1. The model predicts epsilon or v (``prediction_type`` of the
pipeline's scheduler). Text: CLIP last hidden state (B, 77, D), BOS at position 0.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from .base import AttachmentPoint, FamilyAdapter, _Handle, linear_dims
from .conditioning import Conditioning
from .probes import AttentionProbe, record_attention


class SDUNetAdapter(FamilyAdapter):
    """Uniform surface over a StableDiffusionPipeline (epsilon and v_prediction models)."""

    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_names = ("UNet2DConditionModel",)
    supported = "StableDiffusionPipeline (SD 1.x/2.x: UNet2DConditionModel + one CLIP text encoder)"

    @classmethod
    def pipeline_mismatch(cls, components: dict[str, str]) -> str | None:
        """None for a UNet2DConditionModel with one text encoder (SDXL's two are not SD 1.x/2.x)."""
        if components.get("unet") in cls.denoiser_names and "text_encoder_2" not in components:
            return None
        return "it does not have the SD 1.x/2.x components (unet: UNet2DConditionModel, no text_encoder_2)"

    @classmethod
    def loading_kwargs(cls, components: dict[str, str | None], kwargs: dict) -> dict:
        """Without the safety checker unless the caller passes ``safety_checker=``: it blacks out
        the very images erasure is evaluated on."""
        if components.get("safety_checker") and "safety_checker" not in kwargs:
            return {**kwargs, "safety_checker": None, "requires_safety_checker": False}
        return kwargs

    @classmethod
    def matches_denoiser(cls, denoiser: nn.Module) -> bool:
        """Whether ``denoiser`` is a UNet2DConditionModel."""
        return type(denoiser).__name__ in cls.denoiser_names

    def _setup(self) -> None:
        self.default_steps = 50  # ESD recipe: 50 DDIM steps, CFG 3
        self.default_guidance = 3.0
        self.generation_steps = 50  # StableDiffusionPipeline's own defaults
        self.generation_guidance = 7.5
        if self.pipe is not None:
            self.prediction = self.pipe.scheduler.config.get("prediction_type", "epsilon")
            self.vae_scale_factor = self.pipe.vae_scale_factor
            self.noise_scheduler = self._ddim()
        else:
            self.prediction = "epsilon"
            self.vae_scale_factor = 8
            self.noise_scheduler = None
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported SD prediction_type {self.prediction!r}")
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.default_height, self.default_width = h * self.vae_scale_factor, w * self.vae_scale_factor
        self._factors = _attn2_downsampling(self.denoiser)

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet if self.pipe is not None else self._denoiser

    def _ddim(self) -> DDIMScheduler:
        """A fresh DDIMScheduler with the pipeline scheduler's noise schedule."""
        cfg = self._require_pipe("a DDIM scheduler").scheduler.config
        # DDIM defaults to clip_sample=True, which SD checkpoints must not use.
        extra = {} if "clip_sample" in cfg else {"clip_sample": False}
        return DDIMScheduler.from_config(cfg, **extra)

    # ---- text ------------------------------------------------------------------------------

    def encode(self, prompts: list[str], grad: bool = False) -> Conditioning:
        """CLIP last hidden states (B, L, D), L = tokenizer.model_max_length, computed by the
        pipeline's own ``encode_prompt``; differentiable only with ``grad``."""
        pipe = self._require_pipe("encode")
        with torch.set_grad_enabled(grad):
            embeds, _ = pipe.encode_prompt(list(prompts), self._text_device(), 1, False)
        return Conditioning(embeds.to(self.device), None)

    def text_encoders(self) -> list[nn.Module]:
        return [self._require_pipe("text_encoders").text_encoder]

    def checkpoint_units(self) -> list[str]:
        """down_blocks.{i}, mid_block, up_blocks.{i}."""
        d = self.denoiser
        return (
            [f"down_blocks.{i}" for i in range(len(d.down_blocks))]
            + (["mid_block"] if d.mid_block is not None else [])
            + [f"up_blocks.{i}" for i in range(len(d.up_blocks))]
        )

    def _main_tokenizer(self):
        tok = self._require_pipe("token_spans").tokenizer
        return tok, tok.model_max_length

    def main_text_encoder(self):
        pipe = self._require_pipe("main_text_encoder")
        return pipe.tokenizer, pipe.text_encoder

    # ---- denoising -------------------------------------------------------------------------

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        """(C, H/vae_scale_factor, W/vae_scale_factor) for images of height x width pixels."""
        h, w = height or self.default_height, width or self.default_width
        c = self.denoiser.config.in_channels
        return (c, int(h) // self.vae_scale_factor, int(w) // self.vae_scale_factor)

    def sample_noise(self, batch: int, height=None, width=None, generator=None) -> Tensor:
        """Standard normal latents (batch, C, h, w), drawn exactly as the pipeline draws them."""
        shape = (batch,) + self.latent_shape(height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    def predict(self, latents: Tensor, t, cond: Conditioning, guidance: float | None = None) -> Tensor:
        """UNet output (epsilon or v) for latents (B, C, h, w) at integer timesteps t (B,).
        A batch-1 ``cond`` is broadcast to B. ``guidance`` is ignored (SD has no guidance
        embedding). Gradients flow."""
        t = self._batch_t(t, latents.shape[0])
        cond = cond.expand_to(latents.shape[0])
        embeds = cond.embeds.to(device=latents.device, dtype=latents.dtype)
        return self.denoiser(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def _make_sampler(self, num_steps: int, latents: Tensor) -> DDIMScheduler:
        sched = self._ddim()
        sched.set_timesteps(num_steps, device=self.device)
        return sched

    def sample_timesteps(self, batch: int, generator=None) -> Tensor:
        """Uniform integer training timesteps in [0, num_train_timesteps), shape (batch,)."""
        n = self._require_pipe("sample_timesteps").scheduler.config.num_train_timesteps
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, n, (batch,), generator=generator, device=device).to(self.device)

    def call_inputs(self, args: tuple, kwargs: dict):
        """(sample, timestep as (B,), Conditioning(encoder_hidden_states), None)."""
        a = self._forward_arguments(args, kwargs)
        latents = a["sample"]
        return latents, self._batch_t(a["timestep"], latents.shape[0]), Conditioning(a["encoder_hidden_states"]), None

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """DDPM forward process q(x_t | x0): sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        self._require_pipe("add_noise")
        return self.noise_scheduler.add_noise(x0, noise, t.long())

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """epsilon: noise; v_prediction: sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        if self.prediction == "epsilon":
            return noise
        self._require_pipe("training_target")
        return self.noise_scheduler.get_velocity(x0, noise, t.long())

    # ---- images ----------------------------------------------------------------------------

    def encode_images(self, images: Tensor, generator=None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f) times the VAE scaling
        factor. Posterior mode, or a sample when a generator is given."""
        vae = self._require_pipe("encode_images").vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        return z * vae.config.scaling_factor

    def decode_latents(self, latents: Tensor, height=None, width=None) -> Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]. height/width are unused."""
        vae = self._require_pipe("decode_latents").vae
        img = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1)

    def generate(
        self, prompts, seeds, steps=None, guidance=None, height=None, width=None, negative_prompt: str = ""
    ) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from the stock ``StableDiffusionPipeline.__call__``
        (its own scheduler), one CPU generator per prompt seeded with ``seeds[i]``."""
        pipe = self._require_pipe("generate")
        prompts = list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return self._sample(
            pipe,
            seeds,
            steps,
            height,
            width,
            prompt=prompts,
            negative_prompt=[negative_prompt] * len(prompts),
            guidance_scale=self.generation_guidance if guidance is None else guidance,
        )

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
        """Images (B, 3, H, W) in [0, 1] from ready text embeddings (``cond``: B prompts;
        ``uncond``: the negative branch, default the empty prompt) through the stock pipeline,
        one CPU generator per image, as :meth:`generate`."""
        pipe = self._require_pipe("generate_from_conditioning")
        if len(seeds) != cond.batch_size:
            raise ValueError(f"{cond.batch_size} conditionings but {len(seeds)} seeds")
        uncond = (uncond or self.encode([""])).expand_to(cond.batch_size)
        return self._sample(
            pipe,
            seeds,
            steps,
            height,
            width,
            prompt_embeds=cond.embeds.to(self.device, self.dtype),
            negative_prompt_embeds=uncond.embeds.to(self.device, self.dtype),
            guidance_scale=self.generation_guidance if guidance is None else guidance,
        )

    # ---- attention -------------------------------------------------------------------------

    def _attn2(self) -> dict[str, Attention]:
        return {
            name: m for name, m in self.denoiser.named_modules() if name.endswith("attn2") and isinstance(m, Attention)
        }

    def attention_layers(self) -> list[str]:
        """Every cross-attention (attn2) module name, in module order."""
        return list(self._attn2())

    def middle_resolution_layers(self) -> list[str]:
        """attn2 layers at the second smallest spatial resolution among attn2 layers (SD 1.4 at
        64x64 latents: the five 16x16 ones; the 8x8 mid block is the smallest)."""
        factors = sorted(set(self._factors.values()), reverse=True)
        target = factors[1] if len(factors) > 1 else factors[0]
        return [name for name in self.attention_layers() if self._factors[name] == target]

    def keyword_layers(self) -> list[str]:
        """The middle-resolution cross-attention layers (where concept maps are sharpest)."""
        return self.middle_resolution_layers()

    def _default_probe_layers(self) -> list[str]:
        return self.attention_layers()

    def _probe_modules(self, layers: list[str]) -> dict[str, nn.Module]:
        attn2 = self._attn2()
        unknown = [name for name in layers if name not in attn2]
        if unknown:
            raise ValueError(f"not cross-attention layers: {unknown}; known: {list(attn2)}")
        return {name: attn2[name] for name in layers}

    def _make_recorder(self, probe: AttentionProbe, layer: str):
        def record(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
            # Mirrors AttnProcessor2_0 up to the attention probabilities.
            if encoder_hidden_states is None:
                return
            x = hidden_states
            if attn.spatial_norm is not None:
                x = attn.spatial_norm(x, temb)
            if x.ndim == 4:
                b, c, h, w = x.shape
                x = x.view(b, c, h * w).transpose(1, 2)
            b, seq, _ = encoder_hidden_states.shape
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, seq, b)
                mask = mask.view(b, attn.heads, -1, mask.shape[-1])
            if attn.group_norm is not None:
                x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
            q = attn.to_q(x)
            ctx = encoder_hidden_states
            if attn.norm_cross:
                ctx = attn.norm_encoder_hidden_states(ctx)
            k = attn.to_k(ctx)
            head_dim = k.shape[-1] // attn.heads
            q = q.view(b, -1, attn.heads, head_dim).transpose(1, 2)
            k = k.view(b, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            record_attention(probe, layer, q, k, k.shape[2], mask)

        return record

    def _capture_forward_inputs(self, probe: AttentionProbe, args: tuple, kwargs: dict) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        if sample is not None:
            probe.context["latent_hw"] = tuple(sample.shape[-2:])

    def _layer_resolution(self, probe: AttentionProbe, layer: str) -> tuple[int, int]:
        if "latent_hw" not in probe.context:
            raise RuntimeError("no forward pass has run inside the probe yet")
        f = self._factors[layer]
        h, w = probe.context["latent_hw"]
        return math.ceil(h / f), math.ceil(w / f)  # stride-2 convs (padding 1) round up

    # ---- edits -----------------------------------------------------------------------------

    def _attachment_points(self, kind: str) -> list[AttachmentPoint]:
        points = []
        if kind in ("attn_out_extra", "pooled_proj"):  # every attn2 is "attn_out"; no pooled text
            return points
        for name, attn in self._attn2().items():
            if kind == "attn_out":
                points.append(AttachmentPoint(name, attn, linear_dims(attn.to_out[0])[1]))
            else:
                for proj in ("to_k", "to_v"):
                    module = getattr(attn, proj)
                    fan_in, fan_out = linear_dims(module)
                    points.append(AttachmentPoint(f"{name}.{proj}", module, fan_out, fan_in, role=proj[-1]))
        return points

    def _is_cross_attn_layer(self, name: str) -> bool:
        return "attn2" in name.split(".")

    def skip_stages(self) -> int:
        """The UNet's up blocks."""
        return len(self.denoiser.up_blocks)

    def add_skip_edit(self, fn) -> _Handle:
        """A forward pre-hook on every up block maps its ``res_hidden_states_tuple`` (the
        down blocks' skip features it concatenates, FreeU's target) through ``fn(stage, h)``."""
        state = self.edit_stack

        def make(stage: int):
            def hook(_module, args, kwargs):
                features = kwargs.get("res_hidden_states_tuple")
                if state.depth or features is None:
                    return None
                return args, {**kwargs, "res_hidden_states_tuple": tuple(fn(stage, tuple(features)))}

            return hook

        handles = [
            block.register_forward_pre_hook(make(i), with_kwargs=True)
            for i, block in enumerate(self.denoiser.up_blocks)
        ]
        return _Handle(lambda: [h.remove() for h in handles])


def _attn2_downsampling(unet: nn.Module) -> dict[str, int]:
    """attn2 name -> spatial downsampling factor relative to the UNet input (1, 2, 4, ...)."""
    factors: dict[str, int] = {}

    def mark(prefix: str, block: nn.Module, factor: int) -> None:
        for name, m in block.named_modules():
            if name.endswith("attn2") and isinstance(m, Attention):
                factors[f"{prefix}.{name}"] = factor

    factor = 1
    for i, block in enumerate(unet.down_blocks):
        mark(f"down_blocks.{i}", block, factor)
        if getattr(block, "downsamplers", None):
            factor *= 2
    if getattr(unet, "mid_block", None) is not None:
        mark("mid_block", unet.mid_block, factor)
    for i, block in enumerate(unet.up_blocks):
        mark(f"up_blocks.{i}", block, factor)
        if getattr(block, "upsamplers", None):
            factor = max(1, factor // 2)
    return factors
