"""Red-teaming an erasure: can the concept be brought back?

- ``paraphrase`` and ``synonym``: prompt sets of the suite that ask for the concept without its
  usual wording (held-out phrasings, synonyms, indirect mentions).
- ``soft-prompt``: in the style of UnlearnDiffAtk (Zhang et al. 2024): K learnable token
  embeddings are put before the prompt's tokens, in the main text encoder's input embedding
  space, and optimised so that the EDITED model denoises the base model's image of the prompt
  (same seed) well: ``min || pred(x_t, encode([soft; prompt]), t) - target(x0, noise, t) ||^2``
  over random t and noise. The optimised embeddings then generate an image at the prompt's
  seed, and the detector judges it. Unlike UnlearnDiffAtk the tokens stay continuous (a soft
  prompt, the stronger attacker); they are saved as safetensors beside the images.

Attack success rate (ASR): % of attacked prompts whose image shows the concept.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..files import atomic_write_bytes, atomic_write_text
from ..models import Conditioning, frozen
from .detectors import describe, detect_all
from .evaluate import generate_runs, json_safe, resolve_detector, resolve_edits, resolve_suite, write_json
from .records import edit_record, library_versions, model_record
from .report import figure, html_table, image_grid, page, svg_bar_chart, thumbnails
from .runner import _png_bytes, load_image, process_state
from .suites import Case, Suite

ATTACKS = ("paraphrase", "synonym", "soft-prompt")
PROMPT_ATTACKS = ("paraphrase", "synonym")


@dataclass
class SoftPromptConfig:
    """UnlearnDiffAtk-style soft prompt: ``tokens`` embeddings before the prompt, ``steps`` Adam
    steps, ``noise_samples`` (t, noise) draws per step, seeded by ``seed``. ``lr`` is relative
    to the scale of the encoder's token embeddings (their standard deviation), so that one value
    fits CLIP (std ~0.01) and T5 (std ~1) alike."""

    tokens: int = 5
    steps: int = 40
    lr: float = 0.1
    noise_samples: int = 2
    seed: int = 0


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


def _asr(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else math.nan


def attack(
    pipe,
    suite: str | Suite,
    concept: str,
    edits=(),
    out: str | Path = "erasekit-attack",
    attacks=ATTACKS,
    detector=None,
    detector_model: str | None = None,
    threshold=None,
    n: int | None = None,
    soft_prompt: SoftPromptConfig | None = None,
    batch_size: int = 16,
    steps: int | None = None,
    model: str | None = None,
    suite_options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Attack each of ``edits`` (Edit objects or folders) on ``pipe`` with ``attacks`` for
    ``concept``; write ``out``/results.json and ``out``/report.html; return the results.

    Prompt attacks generate the suite's paraphrase / synonym prompts (at most ``n`` each); the
    soft-prompt attack optimises one soft prompt per "plain" prompt (at most ``n``). Every run
    also generates the plain prompts, so the report shows the concept's rate without attack
    (base model and edited) beside each attack's success rate.
    """
    start = time.time()
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; known: {', '.join(ATTACKS)}")
    suite = resolve_suite(suite, suite_options)
    sets = suite.attack_sets(concept)
    for a in attacks:
        if a in PROMPT_ATTACKS and not sets.get(a):
            available = [x for x in ATTACKS if x not in PROMPT_ATTACKS or sets.get(x)]
            raise ValueError(
                f"the {suite.name} suite has no {a} prompts for {concept!r}; attacks available: {', '.join(available)}"
            )
    edits = resolve_edits(edits)
    if not edits:
        raise ValueError("attack needs at least one edit to attack")
    detector = resolve_detector(suite, detector, detector_model, threshold)
    if detector is None:
        raise ValueError(f"the {suite.name} suite has no detector to judge attacks: pass one")
    soft_prompt = soft_prompt or SoftPromptConfig()
    out = Path(out)
    names = ["plain"] + [a for a in attacks if a in PROMPT_ATTACKS]
    cases = [replace(c, set=name) for name in names for c in sets[name][:n]]
    runs = generate_runs(pipe, cases, out, edits, [1.0], batch_size, steps, progress)
    if not process_state().is_main_process:
        return None
    for run in runs:
        found = detect_all(detector, [run["images"][i] for i in range(len(cases))], [concept] * len(cases))
        run["detected"] = [f[0] for f in found]
        run["rates"] = {name: _asr([d for d, c in zip(run["detected"], cases) if c.set == name]) for name in names}
    plain_idx = [i for i, c in enumerate(cases) if c.set == "plain"]
    base_images = runs[0]["images"]
    soft_results = {}
    if "soft-prompt" in attacks:
        from ..edits import apply, remove
        from ..models import adapter_for

        adapter = adapter_for(pipe)
        for e, _run in zip(edits, runs[1:]):
            folder = out / "soft-prompt" / e["label"]
            apply(pipe, e["edit"], scale=1.0)
            records, tensors, images = [], {}, []
            try:
                for i in tqdm(plain_idx, desc=f"soft prompt {e['label']}", disable=not progress, leave=False):
                    c = cases[i]
                    soft, cond, losses = soft_prompt_attack(adapter, c, base_images[i], soft_prompt)
                    with torch.no_grad():
                        img = adapter.generate_from_conditioning(
                            cond, [c.seed], steps=steps, guidance=c.guidance, height=c.height, width=c.width
                        )[0]
                    file = folder / f"{i:05d}.png"
                    atomic_write_bytes(file, _png_bytes(img))
                    images.append(load_image(file))  # score what is on disk (8-bit), as for every run
                    tensors[f"case_{i:05d}"] = soft.contiguous()
                    records.append(
                        {
                            "index": i,
                            "prompt": c.prompt,
                            "seed": c.seed,
                            "file": str(file.relative_to(out)),
                            "loss_before": losses["before"],
                            "loss_after": losses["after"],
                        }
                    )
            finally:
                remove(pipe, e["edit"])
            tmp = folder / ".soft_prompts.safetensors"
            save_file(
                tensors,
                str(tmp),
                metadata={"tokens": str(soft_prompt.tokens), "space": "main text encoder input embeddings"},
            )
            tmp.replace(folder / "soft_prompts.safetensors")
            found = detect_all(detector, images, [concept] * len(images))
            for rec, f in zip(records, found):
                rec["detected"], rec["score"] = f[0], round(f[1], 4)
            soft_results[e["label"]] = {"asr": _asr([f[0] for f in found]), "cases": records, "images": images}
    results = {
        "kind": "attack",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "concept": concept,
        "model": model_record(pipe, model),
        "suite": suite.record()
        | {"n_cases": len(cases), "sets": {name: sum(c.set == name for c in cases) for name in names}},
        "detector": describe(detector),
        "edits": [edit_record(e["edit"], e["path"]) | {"label": e["label"]} for e in edits],
        "attacks": list(attacks),
        "soft_prompt": asdict(soft_prompt) if "soft-prompt" in attacks else None,
        "generation": {"batch_size": batch_size, "steps": runs[0]["records"][0]["steps"], "negative_prompt": ""},
        "seeds": [c.seed for c in cases],
        "versions": library_versions(),
        "runs": [
            {
                "name": r["name"],
                "label": r["label"],
                "folder": r["folder"],
                "rates": r["rates"],
                "cases": [
                    {"prompt": c.prompt, "seed": c.seed, "set": c.set, "detected": d}
                    for c, d in zip(cases, r["detected"])
                ],
            }
            for r in runs
        ],
        "soft_prompt_results": {k: {"asr": v["asr"], "cases": v["cases"]} for k, v in soft_results.items()},
    }
    results["asr"] = {
        r["label"]: {"no attack": r["rates"]["plain"]}
        | {a: r["rates"][a] for a in attacks if a in PROMPT_ATTACKS}
        | ({"soft-prompt": soft_results[r["label"]]["asr"]} if r["label"] in soft_results else {})
        for r in runs
    }
    results["seconds"] = round(time.time() - start, 1)
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.html", attack_report(results, cases, runs, soft_results, plain_idx, suite))
    return json_safe(results)


def attack_report(
    results: dict, cases, runs, soft_results: dict, plain_idx: list[int], suite: Suite, per_row: int = 8
) -> str:
    """The HTML page: ASR table and chart, then images of each attack, base vs edited."""
    cols = ["no attack"] + [a for a in results["attacks"]]
    det = results["detector"]
    sections = [
        f"<p>Concept <b>{_esc(results['concept'])}</b>; suite {_esc(suite.name)}; "
        f"detector {_esc(det['name'])} (threshold {_esc(det['threshold'])}). "
        "Attack success rate (ASR): % of attacked prompts whose image shows the concept; "
        "'no attack' is the rate on the plain prompts.</p>",
        "<h2>Attack success rate (%)</h2>",
        html_table(
            ["model"] + cols, [[label] + [_fmt(rates.get(c)) for c in cols] for label, rates in results["asr"].items()]
        ),
    ]
    edited = [label for label in results["asr"] if label != "base"]
    for c in cols[1:]:
        sections.append(
            svg_bar_chart(
                edited, [_num(results["asr"][label].get(c)) for label in edited], f"ASR of {c} per method", "%"
            )
        )
    pix = 8 if suite.pixelate_grids else None
    for name in ["plain"] + [a for a in results["attacks"] if a in PROMPT_ATTACKS]:
        idx = [i for i, c in enumerate(cases) if c.set == name][:per_row]
        if not idx:
            continue
        sections.append(f"<h2>{_esc(name)} prompts</h2><p>{_esc(cases[idx[0]].prompt)}, ...</p>")
        for r in runs:
            imgs = thumbnails([r["images"][i] for i in idx], pixelate=pix)
            sections.append(
                figure(
                    image_grid(imgs, cols=len(idx), scale=max(1, 96 // imgs.shape[-1])),
                    f"{r['name']}: seeds {', '.join(str(cases[i].seed) for i in idx)}",
                )
            )
    for label, res in soft_results.items():
        k = min(per_row, len(res["images"]))
        if k:
            sections.append(f"<h2>soft-prompt attack on {_esc(label)}</h2>")
            imgs = thumbnails(res["images"][:k], pixelate=pix)
            sections.append(
                figure(
                    image_grid(imgs, cols=k, scale=max(1, 96 // imgs.shape[-1])),
                    f"{label} with optimised soft prompts, plain prompts' seeds "
                    f"{', '.join(str(cases[i].seed) for i in plain_idx[:k])}",
                )
            )
    sections.append("<h2>Provenance</h2>")
    sections.append(
        html_table(["library", "version"], [[k, _fmt(v)] for k, v in results["versions"].items()], cls="versions")
    )
    return page(f"erasekit attacks: {results['concept']} ({suite.name})", sections)


def _fmt(v):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def _esc(text) -> str:
    import html

    return html.escape(str(text))
