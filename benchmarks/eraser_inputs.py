"""Which of Receler's eraser inputs can tell a concept's prompts from its neighbours'?

For every eraser point of a toy pipeline ("attn_out", and "attn_out_extra": Flux's single-stream
blocks), the attention output averaged over image positions is recorded for each prompt at the
same 18 noisy latents (6 rendered scenes x 3 noise levels: the 80th, 50th and 20th percentile of
the training timesteps), so only the prompt differs.
A logistic probe per point is trained on what erasure and preservation training see (the concept
word and "an image of a CONCEPT" against the other objects' word and simple prompt) and scored on
the suite's held-out prompts (the concept's paraphrase, synonym and indirect prompts against the
other objects' locality prompts): AUC over prompts (each prompt's mean score over the latents),
per held-out set, and the neighbour it confuses most. Rows "text" (the prompt's encoding alone)
and "prediction" (the denoiser's output) bracket the points.

    python benchmarks/eraser_inputs.py [--model sd] [--concepts circle,triangle,heart] [--n 12]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Recorder(nn.Module):
    """Adds nothing; keeps the mean over positions of what it reads: (B, C) per forward."""

    def __init__(self, store: dict, name: str):
        super().__init__()
        self.store, self.name = store, name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.store[self.name] = h.detach().float().mean(1)
        return torch.zeros_like(h)


def _latents(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    from erasekit.toyworld.train import render_dataset

    _, images = render_dataset(6, seed=123)
    x0 = adapter.encode_images(images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ts = adapter.sample_timesteps(512, generator=torch.Generator().manual_seed(1)).sort().values
    xs, tt = [], []
    for q in (0.8, 0.5, 0.2):
        t = ts[int(q * (len(ts) - 1))].repeat(len(x0))
        xs.append(adapter.add_noise(x0, noise, t))
        tt.append(t)
    return torch.cat(xs), torch.cat(tt)


def _probe(pos: torch.Tensor, neg: torch.Tensor, steps: int = 300):
    """A standardised, class-balanced, L2-regularised logistic regression: features -> score."""
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    weight = torch.tensor(len(neg) / len(pos))
    for _ in range(steps):
        z = ((x - mu) / sd) @ w + b
        loss = F.binary_cross_entropy_with_logits(z, y, pos_weight=weight) + 1e-2 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda f: (((f - mu) / sd) @ w + b).detach()


def _auc(pos: list[float], neg: list[float]) -> float:
    p, n = torch.tensor(pos)[:, None], torch.tensor(neg)[None]
    return ((p > n).float().mean() + 0.5 * (p == n).float().mean()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd")
    ap.add_argument("--concepts", default="circle,triangle,heart")
    ap.add_argument("--n", type=int, default=12, help="held-out prompts per set and per other object")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from erasekit.edits.output_adapter import attach_modules
    from erasekit.evaluation.suites import make_suite
    from erasekit.models import adapter_for, load_pipeline
    from erasekit.toyworld.attributes import suite_for_concept

    pipe = load_pipeline(f"toy:{args.model}")
    adapter = adapter_for(pipe)
    points = [p.name for kind in ("attn_out", "attn_out_extra") for p in adapter.attachment_points(kind)]
    store: dict[str, torch.Tensor] = {}
    attach_modules(adapter, {p: _Recorder(store, p) for p in points}, "probe")
    with torch.no_grad():
        latents, timesteps = _latents(adapter)

    def features(prompt: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = adapter.predict(latents, timesteps, adapter.encode([prompt] * len(latents)))
            enc = adapter.encode([prompt])
        text = enc.embeds.float().flatten(1)
        if enc.pooled is not None:
            text = torch.cat([text, enc.pooled.float()], 1)
        return {"text": text.repeat(len(latents), 1), "prediction": out.float().flatten(1)} | dict(store)

    print(f"model toy:{args.model}; probes trained on the word and the simple prompt against the other objects'")
    print("| concept | features | AUC held-out | paraphrase | synonym | indirect | most confused neighbour (AUC) |")
    print("|---|---|---|---|---|---|---|")
    for concept in args.concepts.split(","):
        cases = make_suite(suite_for_concept(concept), n=args.n, n_locality=args.n).cases(concept)
        others = sorted({c.label for c in cases if c.label != concept})
        train_pos = [concept, f"an image of a {concept}"]
        train_neg = [w for o in others for w in (o, f"an image of a {o}")]
        held = [c for c in cases if c.set != "simple"]
        feats = {p: features(p) for p in dict.fromkeys(train_pos + train_neg + [c.prompt for c in held])}
        for key in ["text", *points, "prediction"]:
            score = _probe(
                torch.cat([feats[p][key] for p in train_pos]), torch.cat([feats[p][key] for p in train_neg])
            )
            s = {p: score(feats[p][key]).mean().item() for p in dict.fromkeys(c.prompt for c in held)}
            pos = [s[c.prompt] for c in held if c.label == concept]
            neg = [s[c.prompt] for c in held if c.label != concept]
            sets = [
                _auc([s[c.prompt] for c in held if c.label == concept and c.set == k], neg)
                for k in ("paraphrase", "synonym", "indirect")
            ]
            near = {o: _auc(pos, [s[c.prompt] for c in held if c.label == o]) for o in others}
            worst = min(near, key=near.get)
            print(
                f"| {concept} | {key} | {_auc(pos, neg):.3f} | "
                + " | ".join(f"{a:.3f}" for a in sets)
                + f" | {worst} ({near[worst]:.3f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
