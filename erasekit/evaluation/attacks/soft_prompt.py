"""``soft-prompt``: a continuous soft prompt in the style of UnlearnDiffAtk (Zhang et al., ECCV 2024).

K learnable token embeddings are put before the prompt's tokens, in the main text encoder's
input-embedding space, and optimised so that the EDITED model denoises the base model's image of
the prompt (same seed) well: ``min || pred(x_t, encode([soft; prompt]), t) - target(x0, noise, t) ||^2``
over random t and noise. The optimised embeddings then generate an image at the prompt's seed,
and the detector judges it. Unlike UnlearnDiffAtk the tokens stay continuous (a soft prompt,
the stronger attacker, not a string a user could type) and only the attacked image counts:
its success rate is not comparable with the paper's (see ``unlearndiffatk`` for the faithful
attack). The optimised embeddings are saved as safetensors beside the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...methods.config import setting
from ...models import Conditioning, frozen
from ..metrics import percent
from ..suites import Case
from .base import AttackConfig, AttackContext, AttackOutcome, AttackSpec, register_attack


@dataclass
class SoftPromptConfig(AttackConfig):
    """``tokens`` embeddings before the prompt, ``steps`` Adam steps, ``noise_samples`` (t, noise)
    draws per step, seeded by ``seed``. ``lr`` is relative to the scale of the encoder's token
    embeddings (their standard deviation), so that one value fits CLIP (std ~0.01) and T5
    (std ~1) alike."""

    tokens: int = setting(5, "soft token embeddings put before the prompt", low=1)
    steps: int = setting(40, "Adam steps per prompt", low=1)
    lr: float = setting(0.1, "learning rate, in units of the token embeddings' standard deviation", above=0)
    noise_samples: int = setting(2, "(t, noise) draws per step", low=1)


class SoftPrompt:
    """A prompt with ``k`` free token embeddings before its tokens, encoded with gradients.

    ``ids``: (1, L) token ids of the main tokenizer (L = the pipeline's text length) with the
    ``k`` slots at ``positions`` (after BOS where the tokenizer has one, else first); the prompt
    is truncated to L - k tokens. :meth:`encode` gives the Conditioning with ``values`` (k, D)
    written into the input embeddings at the slots.
    """

    def __init__(self, adapter, prompt: str, k: int):
        if k < 1:
            raise ValueError(f"a soft prompt needs at least one token, got {k}")
        self.adapter = adapter
        self.tokenizer, self.encoder = adapter.main_text_encoder()
        _, length = adapter._main_tokenizer()
        if k >= length - 2:
            raise ValueError(f"{k} soft tokens do not fit in {length} text tokens")
        ids = list(self.tokenizer(prompt, padding="max_length", max_length=length - k, truncation=True)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        first = 1 if bos is not None and ids and ids[0] == bos else 0
        slot = self.tokenizer.unk_token_id if self.tokenizer.unk_token_id is not None else 0
        self.ids = torch.tensor([ids[:first] + [slot] * k + ids[first:]], device=self.encoder.device)
        self.positions = torch.arange(first, first + k, device=self.encoder.device)
        self.pooled = adapter.encode([prompt]).pooled  # Flux's pooled CLIP stays the prompt's own

    @property
    def embedding(self) -> torch.nn.Module:
        return self.encoder.get_input_embeddings()

    def encode(self, values: torch.Tensor) -> Conditioning:
        """Conditioning (batch 1) with the slots' input embeddings = ``values`` (k, D); differentiable."""

        def put(_module, _inputs, output):
            v = values.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
            return output.index_copy(1, self.positions, v)

        # Every embedding module over the input-embedding weights (T5 keeps a second one, tied).
        weight = self.embedding.weight
        tied = [m for m in self.encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is weight]
        handles = [m.register_forward_hook(put) for m in tied]
        try:
            embeds = self.encoder(self.ids)[0]
        finally:
            for h in handles:
                h.remove()
        return Conditioning(embeds.to(self.adapter.dtype), self.pooled)


def soft_prompt_attack(
    adapter, case: Case, target: torch.Tensor, config: SoftPromptConfig | None = None
) -> tuple[torch.Tensor, Conditioning, list[float]]:
    """Optimise a soft prompt for ``case`` against the pipeline as it is now (the edited model).

    ``target``: the base model's image for the case, (3, H, W) in [0, 1]. Returns the soft
    token embeddings (k, D), the final Conditioning (detached) and the losses: per step, and
    "before"/"after" on 8 fixed (t, noise) draws (MSE in the model's prediction units).
    """
    config = config or SoftPromptConfig()
    prompt = SoftPrompt(adapter, case.prompt, config.tokens)
    g = torch.Generator().manual_seed(config.seed)
    weight = prompt.embedding.weight
    init_ids = torch.randint(0, weight.shape[0], (config.tokens,), generator=g)
    soft = torch.nn.Parameter(weight[init_ids.to(weight.device)].detach().clone().float())
    opt = torch.optim.Adam([soft], lr=config.lr * float(weight.detach().float().std()))
    pipe = adapter.pipe
    with torch.no_grad():
        x0 = adapter.encode_images(target[None].to(adapter.device, adapter.dtype) * 2 - 1)
    # A fixed set of (t, noise) draws measures the objective before and after (the per-step
    # loss swings with t far more than with the prompt).
    probe_g = torch.Generator().manual_seed(config.seed + 1)
    probe_t = adapter.sample_timesteps(8, generator=probe_g)
    probe_noise = torch.randn((8,) + tuple(x0.shape[1:]), generator=probe_g).to(x0.device, x0.dtype)

    def probe_loss() -> float:
        with torch.no_grad():
            x0s = target_latents.expand(8, *target_latents.shape[1:])
            pred = adapter.predict(adapter.add_noise(x0s, probe_noise, probe_t), probe_t, prompt.encode(soft.detach()))
            return float(F.mse_loss(pred.float(), adapter.training_target(x0s, probe_noise, probe_t).float()))

    target_latents = x0
    x0 = x0.expand(config.noise_samples, *x0.shape[1:])
    losses = []
    with frozen(*pipe.components.values()):
        before = probe_loss()
        for _ in range(config.steps):
            t = adapter.sample_timesteps(config.noise_samples, generator=g)
            noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
            x_t = adapter.add_noise(x0, noise, t)
            pred = adapter.predict(x_t, t, prompt.encode(soft))
            loss = F.mse_loss(pred.float(), adapter.training_target(x0, noise, t).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        after = probe_loss()
    with torch.no_grad():
        cond = prompt.encode(soft.detach()).detach()
    return soft.detach().cpu(), cond, {"steps": losses, "before": before, "after": after}


def run_soft_prompt(ctx: AttackContext, config: SoftPromptConfig) -> AttackOutcome:
    """One soft prompt per plain prompt, optimised on the edited model; its image judged."""
    records, images, tensors = [], [], {}
    for i, c in enumerate(tqdm(ctx.cases, desc=f"soft prompt {ctx.label}", disable=not ctx.progress, leave=False)):
        soft, cond, losses = soft_prompt_attack(ctx.adapter, c, ctx.base_images[i], config)
        img = ctx.generate_from_conditioning(cond, c)
        images.append(img)
        tensors[f"case_{i:05d}"] = soft.contiguous()
        records.append(
            {
                "index": i,
                "prompt": c.prompt,
                "seed": c.seed,
                "file": ctx.save_image(f"{i:05d}.png", img),
                "loss_before": losses["before"],
                "loss_after": losses["after"],
            }
        )
    for rec, (found, score) in zip(records, ctx.judge(images)):
        rec["detected"], rec["score"] = found, round(score, 4)
    return AttackOutcome(
        asr=percent([r["detected"] for r in records]),
        definition="% of plain prompts whose image with the optimised soft prompt shows the concept",
        records=records,
        images=images,
        tensors=tensors,
    )


register_attack(
    AttackSpec(
        "soft-prompt",
        SoftPromptConfig,
        run_soft_prompt,
        reference="continuous variant of Zhang et al., ECCV 2024 (UnlearnDiffAtk)",
        quick={"tokens": 3, "steps": 10},
    )
)
