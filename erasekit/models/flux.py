"""Adapter for FLUX.1 (``FluxPipeline``, a FluxTransformer2DModel, rectified flow).

Latents are PACKED: (B, N, C*4) with N = (H/16) * (W/16) 2x2 patches of the VAE latent, the
VAE latent already shifted and scaled. Timesteps: sigma * 1000 (FlowMatchEulerDiscreteScheduler
units, sigma = 1 is pure noise); the transformer receives t / 1000. The model predicts the flow
velocity noise - x0. Text: T5 embeddings (B, L, D) with L = ``max_sequence_length`` (no BOS),
plus the pooled CLIP embedding (B, Dp).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from .base import AttachmentPoint, FamilyAdapter, _Handle, linear_dims
from .conditioning import Conditioning
from .probes import AttentionProbe, record_attention


class FluxAdapter(FamilyAdapter):
    """Uniform surface over a FluxPipeline (guidance-distilled or not)."""

    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_names = ("FluxTransformer2DModel",)
    supported = "FluxPipeline (FLUX.1: FluxTransformer2DModel + CLIP + T5)"
    conditioning_parameters = ("encoder_hidden_states", "pooled_projections")

    @classmethod
    def pipeline_mismatch(cls, components: dict[str, str]) -> str | None:
        """None for a FluxTransformer2DModel with the T5 encoder (text_encoder_2) beside CLIP."""
        if components.get("transformer") in cls.denoiser_names and "text_encoder_2" in components:
            return None
        return "it does not have the FLUX.1 components (transformer: FluxTransformer2DModel, text_encoder_2)"

    @classmethod
    def matches_denoiser(cls, denoiser: nn.Module) -> bool:
        """Whether ``denoiser`` is a FluxTransformer2DModel."""
        return type(denoiser).__name__ in cls.denoiser_names

    def _setup(self) -> None:
        self.prediction = "flow"
        self.default_steps = 28  # ESD recipe for Flux: 28 Euler steps, guidance 3.5
        self.default_guidance = 3.5
        self.generation_steps = 28
        self.generation_guidance = 3.5
        self.max_sequence_length = 512
        if self.pipe is not None:
            self.vae_scale_factor = self.pipe.vae_scale_factor
            size = self.pipe.default_sample_size * self.vae_scale_factor
        else:
            self.vae_scale_factor, size = 8, 1024
        self.default_height = self.default_width = size
        # Packed latents do not carry their grid: remember the grids of latents we made.
        self._grids: dict[int, tuple[int, int]] = {}

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.transformer if self.pipe is not None else self._denoiser

    @property
    def guidance_embeds(self) -> bool:
        """True for guidance-distilled models (FLUX.1-dev / schnell style)."""
        return bool(self.denoiser.config.guidance_embeds)

    # ---- layout ----------------------------------------------------------------------------

    def _latent_hw(self, height, width) -> tuple[int, int]:
        """Unpacked VAE-latent size (even) for an image of height x width pixels."""
        h, w = int(height or self.default_height), int(width or self.default_width)
        f = self.vae_scale_factor * 2
        return 2 * (h // f), 2 * (w // f)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        """(N, C*4): N packed 2x2 patches of the (C, h, w) VAE latent of a height x width image."""
        lh, lw = self._latent_hw(height, width)
        n = (lh // 2) * (lw // 2)
        self._grids[n] = (lh // 2, lw // 2)
        return (n, self.denoiser.config.in_channels)

    def _grid(self, n_tokens: int) -> tuple[int, int]:
        if n_tokens in self._grids:
            return self._grids[n_tokens]
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(
                f"cannot infer the image grid of {n_tokens} packed tokens; "
                "call latent_shape(height, width) for non-square sizes first"
            )
        return side, side

    def _img_ids(self, n_tokens: int, device, dtype) -> Tensor:
        gh, gw = self._grid(n_tokens)
        return FluxPipeline._prepare_latent_image_ids(None, gh, gw, device, dtype)

    def pack(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) VAE latents -> packed (B, N, C*4)."""
        b, c, h, w = latents.shape
        self._grids[(h // 2) * (w // 2)] = (h // 2, w // 2)
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    def unpack(self, latents: Tensor, height=None, width=None) -> Tensor:
        """Packed (B, N, C*4) -> (B, C, h, w); the size comes from height/width (pixels) or
        from the grid the latents were made with."""
        if height is None and width is None:
            gh, gw = self._grid(latents.shape[1])
            height = gh * 2 * self.vae_scale_factor
            width = gw * 2 * self.vae_scale_factor
        return FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)

    # ---- text ------------------------------------------------------------------------------

    def encode(self, prompts: list[str], grad: bool = False) -> Conditioning:
        """T5 embeddings (B, max_sequence_length, D) and pooled CLIP (B, Dp) from the pipeline's
        own ``encode_prompt``; differentiable only with ``grad``."""
        pipe = self._require_pipe("encode")
        with torch.set_grad_enabled(grad):
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                device=self._text_device(),
                max_sequence_length=self.max_sequence_length,
            )
        return Conditioning(embeds.to(self.device), pooled.to(self.device))

    def text_encoders(self) -> list[nn.Module]:
        pipe = self._require_pipe("text_encoders")
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2) if m is not None]

    def checkpoint_units(self) -> list[str]:
        """Every dual-stream then single-stream block (the attention layer names)."""
        return self.attention_layers()

    def _main_tokenizer(self):
        return self._require_pipe("token_spans").tokenizer_2, self.max_sequence_length

    def main_text_encoder(self):
        pipe = self._require_pipe("main_text_encoder")
        return pipe.tokenizer_2, pipe.text_encoder_2

    # ---- denoising -------------------------------------------------------------------------

    def sample_noise(self, batch: int, height=None, width=None, generator=None) -> Tensor:
        """Packed standard-normal latents (batch, N, C*4), drawn as FluxPipeline draws them."""
        lh, lw = self._latent_hw(height, width)
        c = self.denoiser.config.in_channels // 4
        noise = randn_tensor((batch, c, lh, lw), generator=generator, device=self.device, dtype=self.dtype)
        return self.pack(noise)

    def predict(self, latents: Tensor, t, cond: Conditioning, guidance: float | None = None) -> Tensor:
        """Flow velocity (B, N, C*4) at t (B,) in sigma*1000 units. A batch-1 ``cond`` is
        broadcast to B. Guidance-distilled models get the guidance embedding ``guidance``
        (default ``default_guidance``). Gradients flow."""
        b, n, _ = latents.shape
        t = self._batch_t(t, b)
        if cond.pooled is None:
            raise ValueError("Flux conditioning needs pooled CLIP embeddings")
        cond = cond.expand_to(b).to(latents.device, latents.dtype)
        g = None
        if self.guidance_embeds:
            g = torch.full(
                (b,),
                self.default_guidance if guidance is None else guidance,
                device=latents.device,
                dtype=torch.float32,
            )
        return self.denoiser(
            hidden_states=latents,
            timestep=t.to(latents.dtype) / 1000,
            guidance=g,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=self._img_ids(n, latents.device, latents.dtype),
            return_dict=False,
        )[0]

    def guided_predict(
        self, latents: Tensor, t, cond: Conditioning, uncond: Conditioning | None, scale: float
    ) -> Tensor:
        """Guidance-distilled model: ONE pass with guidance embedding = scale (uncond ignored).
        Otherwise true CFG: uncond + scale * (cond - uncond)."""
        if self.guidance_embeds:
            return self.predict(latents, t, cond, guidance=scale)
        return super().guided_predict(latents, t, cond, uncond, scale)

    def _make_sampler(self, num_steps: int, latents: Tensor):
        # Exactly FluxPipeline.__call__'s schedule: linear sigmas, resolution-dependent shift mu.
        pipe = self._require_pipe("rollout")
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(cfg, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        retrieve_timesteps(sched, num_steps, self.device, sigmas=sigmas, mu=mu)
        sched.set_begin_index(0)
        return sched

    def sample_timesteps(self, batch: int, generator=None) -> Tensor:
        """sigma * 1000 with sigma ~ U(0, 1), float32, shape (batch,)."""
        device = generator.device if generator is not None else "cpu"
        return (torch.rand(batch, generator=generator, device=device) * 1000).to(self.device)

    def call_inputs(self, args: tuple, kwargs: dict):
        """(hidden_states, timestep * 1000, Conditioning(encoder_hidden_states,
        pooled_projections), guidance as a float or None). The image grid of the packed latents
        is read from ``img_ids``, so that :meth:`predict` also repeats non-square calls."""
        a = self._forward_arguments(args, kwargs)
        latents = a["hidden_states"]
        ids = a.get("img_ids")
        if ids is not None and latents.shape[1] not in self._grids:
            ids = ids.reshape(-1, ids.shape[-1])
            grid = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            if grid[0] * grid[1] == latents.shape[1]:
                self._grids[latents.shape[1]] = grid
        t = self._batch_t(a["timestep"], latents.shape[0]) * 1000
        g = a.get("guidance")
        guidance = None if g is None else float(g.reshape(-1)[0])
        return latents, t, Conditioning(a["encoder_hidden_states"], a.get("pooled_projections")), guidance

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Rectified-flow interpolation (1 - s) x0 + s noise with s = t / 1000."""
        s = (t.float() / 1000).view(-1, *([1] * (x0.dim() - 1)))
        return ((1 - s) * x0 + s * noise).to(x0.dtype)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Flow velocity noise - x0."""
        return noise - x0

    # ---- images ----------------------------------------------------------------------------

    def encode_images(self, images: Tensor, generator=None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> packed latents (B, N, C*4), shifted and scaled as
        FluxPipeline expects. Posterior mode, or a sample when a generator is given."""
        vae = self._require_pipe("encode_images").vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        return self.pack(z)

    def decode_latents(self, latents: Tensor, height=None, width=None) -> Tensor:
        """Packed latents (B, N, C*4) -> images (B, 3, H, W) in [0, 1]."""
        vae = self._require_pipe("decode_latents").vae
        z = self.unpack(latents, height, width)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1)

    def generate(
        self, prompts, seeds, steps=None, guidance=None, height=None, width=None, negative_prompt: str = ""
    ) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from the stock ``FluxPipeline.__call__``, one CPU
        generator per prompt. Distilled models: ``guidance_scale``; others: true CFG with
        ``negative_prompt`` and ``true_cfg_scale``."""
        pipe = self._require_pipe("generate")
        prompts = list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        g = self.generation_guidance if guidance is None else guidance
        kwargs = (
            {"guidance_scale": g}
            if self.guidance_embeds
            else {"true_cfg_scale": g, "negative_prompt": [negative_prompt] * len(prompts)}
        )
        return self._sample(
            pipe, seeds, steps, height, width, prompt=prompts, max_sequence_length=self.max_sequence_length, **kwargs
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
        """Images (B, 3, H, W) in [0, 1] from ready embeddings (``cond``: T5 embeds and pooled
        CLIP for B prompts; ``uncond``: the negative branch of true CFG, default the empty
        prompt) through the stock pipeline, one CPU generator per image, as :meth:`generate`."""
        pipe = self._require_pipe("generate_from_conditioning")
        if len(seeds) != cond.batch_size:
            raise ValueError(f"{cond.batch_size} conditionings but {len(seeds)} seeds")
        if cond.pooled is None:
            raise ValueError("Flux conditioning needs pooled CLIP embeddings")
        g = self.generation_guidance if guidance is None else guidance
        cond = cond.to(self.device, self.dtype)
        kwargs = {"guidance_scale": g}
        if not self.guidance_embeds:
            uncond = (uncond or self.encode([""])).expand_to(cond.batch_size).to(self.device, self.dtype)
            kwargs = {
                "true_cfg_scale": g,
                "negative_prompt_embeds": uncond.embeds,
                "negative_pooled_prompt_embeds": uncond.pooled,
            }
        return self._sample(
            pipe,
            seeds,
            steps,
            height,
            width,
            prompt_embeds=cond.embeds,
            pooled_prompt_embeds=cond.pooled,
            max_sequence_length=self.max_sequence_length,
            **kwargs,
        )

    # ---- attention -------------------------------------------------------------------------

    def attention_layers(self) -> list[str]:
        """ "transformer_blocks.{i}" (dual-stream) then "single_transformer_blocks.{i}"."""
        d = self.denoiser
        return [f"transformer_blocks.{i}" for i in range(len(d.transformer_blocks))] + [
            f"single_transformer_blocks.{i}" for i in range(len(d.single_transformer_blocks))
        ]

    def middle_resolution_layers(self) -> list[str]:
        """All dual-stream blocks (a transformer has a single resolution)."""
        return [f"transformer_blocks.{i}" for i in range(len(self.denoiser.transformer_blocks))]

    def keyword_layers(self) -> list[str]:
        """The last dual-stream block (what EraseAnything's release probes)."""
        return self.middle_resolution_layers()[-1:]

    def _default_probe_layers(self) -> list[str]:
        return self.middle_resolution_layers()

    def _probe_modules(self, layers: list[str]) -> dict[str, nn.Module]:
        known = self.attention_layers()
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise ValueError(f"not Flux attention blocks: {unknown}; known: {known}")
        return {name: self.denoiser.get_submodule(name).attn for name in layers}

    def _make_recorder(self, probe: AttentionProbe, layer: str):
        def record(
            attn,
            hidden_states,
            encoder_hidden_states=None,
            attention_mask=None,
            image_rotary_emb=None,
            *args,
            **kwargs,
        ):
            # Mirrors FluxAttnProcessor up to the joint attention probabilities.
            fused = getattr(attn, "fused_projections", False)
            if fused:
                q, k, _ = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
            q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
            k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                if fused:
                    eq, ek, _ = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
                else:
                    eq, ek = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states)
                eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
                ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
                q, k = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1)
                text_len = encoder_hidden_states.shape[1]
            else:  # single-stream block: the sequence is already [text, image]
                text_len = probe.context["text_len"]
            if image_rotary_emb is not None:
                q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
                k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            q_img = q[:, text_len:].transpose(1, 2)  # (B, H, N_img, D)
            record_attention(probe, layer, q_img, k.transpose(1, 2), text_len, _mask_rows(attention_mask, text_len))

        return record

    def _capture_forward_inputs(self, probe: AttentionProbe, args: tuple, kwargs: dict) -> None:
        ehs = _text_argument(args, kwargs)
        if ehs is not None:
            probe.context["text_len"] = ehs.shape[1]
        probe.context["img_ids"] = kwargs.get("img_ids")

    def _layer_resolution(self, probe: AttentionProbe, layer: str) -> tuple[int, int]:
        ids = probe.context.get("img_ids")
        if ids is None:
            raise RuntimeError("no forward pass (with img_ids) has run inside the probe yet")
        ids = ids.reshape(-1, ids.shape[-1])
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    # ---- edits -----------------------------------------------------------------------------

    def _attachment_points(self, kind: str) -> list[AttachmentPoint]:
        points = []
        if kind == "attn_out_extra":
            # The single-stream attention has no output projection; its output (B, L + N, C) is
            # the joint sequence, of which output edits see the image part (add_output_edit).
            for i, block in enumerate(self.denoiser.single_transformer_blocks):
                points.append(
                    AttachmentPoint(f"single_transformer_blocks.{i}.attn", block.attn, linear_dims(block.attn.to_v)[1])
                )
            return points
        if kind == "pooled_proj":
            name = "time_text_embed.text_embedder.linear_1"
            module = self.denoiser.get_submodule(name)
            fan_in, fan_out = linear_dims(module)
            return [AttachmentPoint(name, module, fan_out, fan_in, role="pooled")]
        for i, block in enumerate(self.denoiser.transformer_blocks):
            attn, name = block.attn, f"transformer_blocks.{i}.attn"
            if kind == "attn_out":
                points.append(AttachmentPoint(name, attn, linear_dims(attn.to_out[0])[1]))
            else:
                for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
                    module = getattr(attn, proj)
                    fan_in, fan_out = linear_dims(module)
                    points.append(AttachmentPoint(f"{name}.{proj}", module, fan_out, fan_in, role=proj[4]))
        return points

    def add_output_edit(self, point: AttachmentPoint, fn):
        """As the base; on a single-stream block's attention, fn sees the image tokens
        (B, N, C) only: the text length is read from the block's inputs at each forward."""
        if not point.name.startswith("single_transformer_blocks."):
            return super().add_output_edit(point, fn)
        block = self.denoiser.get_submodule(point.name.rsplit(".", 1)[0])
        seen: dict[str, int] = {}

        def read_text_len(_module, args, kwargs):
            text = _text_argument(args, kwargs)
            seen["text_len"] = text.shape[1]

        def image_part(h: Tensor) -> Tensor:
            n = seen["text_len"]
            return torch.cat([h[:, :n], fn(h[:, n:])], dim=1)

        pre = block.register_forward_pre_hook(read_text_len, with_kwargs=True)
        post = super().add_output_edit(point, image_part)
        return _Handle(lambda: (post.remove(), pre.remove()))

    def _is_cross_attn_layer(self, name: str) -> bool:
        # The text stream of the dual-stream joint attention: its Q/K/V and output projections.
        return (
            re.match(r"transformer_blocks\.\d+\.attn\.(add_[qkv]_proj|to_add_out|to_added_qkv)(\.|$)", name)
            is not None
        )


def _text_argument(args: tuple, kwargs: dict) -> Tensor | None:
    """``encoder_hidden_states`` of a call of the transformer or of one of its blocks (both take
    it as the second positional argument or by keyword)."""
    return kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)


def _mask_rows(mask: Tensor | None, text_len: int) -> Tensor | None:
    """A joint-attention mask reduced to the image-query rows, as (B|1, H|1, Q|1, S)."""
    if mask is None:
        return None
    if mask.dim() == 2:  # (B, S) key mask
        return mask[:, None, None, :]
    if mask.dim() == 3:
        mask = mask[:, None]
    return mask if mask.shape[-2] == 1 else mask[..., text_len:, :]
