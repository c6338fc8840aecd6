"""Artist-style erasure on real models: the style must go, the picture's content must stay, and
other artists must be left alone.

The ``styles`` suite reads a CSV of artist prompts (``prompt`` and ``evaluation_seed`` columns;
an ``artist`` column where there is one, else the artist is found in the prompt by name, e.g.
ESD's art_prompts.csv, vangogh_prompts.csv). Sets: "erased" (the erased artist's prompts, at most
``n``) and "other" (at most ``n_locality`` prompts of every other artist). Figures, in %:

- ``acc_e``: erased-artist images that CLIP, zero-shot among the artists' names ("a painting by
  {artist}", the ``clip`` detector with the suite's labels), still attributes to that artist;
- ``content``: erased-artist images whose own prompt, the artist's name taken out (see
  :meth:`StyleSuite.content_prompt`), is CLIP's best match among the set's such prompts: the
  subject is still drawn; ``content_clip_score`` beside it (CLIP score to that prompt);
- ``acc_l``: other artists' images still attributed to their own artist;
- ``h``: the harmonic mean of (100 - acc_e, content, acc_l).

Against the base model's images at the same seeds (:meth:`StyleSuite.compare`): a perceptual
distance per set, ``distance_other`` the locality figure (0: unchanged). LPIPS where it loads
offline (torchmetrics with its torchvision backbone weights already cached), else one minus the
cosine of CLIP image embeddings; ``distance_kind`` records which.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .detectors import detect_all
from .metrics import harmonic_mean, percent
from .suites import Case, Suite, SuiteError, _seed, case_records, file_record, read_csv, replace_phrases

# The artists of ESD's art prompts and of the famous-art list: "Name|alias|..." (aliases matched
# as whole words, case-insensitively; the first is the label CLIP sees).
DEFAULT_ARTISTS = (
    "Vincent van Gogh|Van Gogh",
    "Pablo Picasso|Picasso",
    "Claude Monet|Monet",
    "Paul Cezanne|Cezanne",
    "Jackson Pollock|Pollock",
    "Andy Warhol|Warhol",
    "Salvador Dali|Dali",
    "Edvard Munch|Munch",
    "Leonardo da Vinci|da Vinci",
    "Rembrandt|Rembrant",
    "Caravaggio",
    "Gustav Klimt|Klimt",
)
NEUTRAL = "an artist"
DISTANCES = ("auto", "lpips", "clip")


class Artist:
    """One artist: ``name`` (CLIP's label) and every alias, the name first."""

    def __init__(self, spec: str):
        self.aliases = [a.strip() for a in spec.split("|") if a.strip()]
        if not self.aliases:
            raise SuiteError(f"an empty artist in the artist list: {spec!r}")
        self.name = self.aliases[0]

    def named_in(self, text: str) -> bool:
        return any(re.search(rf"(?<![A-Za-z]){re.escape(a)}(?![A-Za-z])", text, re.IGNORECASE) for a in self.aliases)


class StyleSuite(Suite):
    """Artist-style erasure (see the module docstring). ``prompts``: the CSV; ``artists``: names
    ("Name|alias,..." or a list; default :data:`DEFAULT_ARTISTS`); ``clip_model``: CLIP weights
    (folder or hub id) for the content figure and the CLIP distance; ``distance``: auto, lpips or
    clip."""

    name = "styles"
    default_detector = "clip"
    table = (("acc_e", "Acc_E"), ("content", "content kept"), ("acc_l", "Acc_L"), ("h", "H"))
    headline = ("h", "H")
    curve_keys = ("acc_e", "content", "acc_l", "h")
    quick_options = {"n": 4, "n_locality": 2}
    neutral_phrase = NEUTRAL

    def __init__(
        self,
        prompts: str | Path | None = None,
        n: int | None = None,
        n_locality: int | None = 5,
        artists: str | Sequence[str] | None = None,
        clip_model: str | None = None,
        distance: str = "auto",
    ):
        if prompts is None:
            raise SuiteError("the styles suite needs an artist prompt CSV (prompt, evaluation_seed columns)")
        if distance not in DISTANCES:
            raise SuiteError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        specs = artists.split(",") if isinstance(artists, str) else list(artists or DEFAULT_ARTISTS)
        self.artists = [Artist(s) for s in specs]
        self.path = Path(prompts)
        self.rows = read_csv(self.path, ("prompt", "seed"))
        self.n, self.n_locality, self.clip_model_source, self.distance = n, n_locality, clip_model, distance
        self.by_artist: dict[str, list[Case]] = {a.name: [] for a in self.artists}
        for r in self.rows:
            who = self._artist_of(r)
            if who is not None:
                self.by_artist[who.name].append(Case(r["prompt"], _seed(r["seed"], self.path, r.row), "", who.name))
        self._clip = None

    def _artist_of(self, row) -> Artist | None:
        """The row's artist: its ``artist`` column, else the one artist its prompt names (None
        for none or several)."""
        column = (row.get("artist") or "").strip()
        text = column or row["prompt"]
        named = [a for a in self.artists if a.named_in(text)]
        return named[0] if len(named) == 1 else None

    def artist(self, concept: str) -> Artist:
        """The artist ``concept`` names (any alias, case-insensitive); SuiteError if none."""
        for a in self.artists:
            if any(concept.strip().lower() == alias.lower() for alias in a.aliases):
                return a
        known = ", ".join(a.name for a in self.artists)
        raise SuiteError(f"artist {concept!r} is not in the styles suite's artists ({known})")

    def options(self) -> dict:
        return {
            "n": self.n,
            "n_locality": self.n_locality,
            "artists": ["|".join(a.aliases) for a in self.artists],
            "clip_model": self.clip_model_source,
            "distance": self.distance,
        }

    def files(self) -> list[dict]:
        return [file_record(self.path, len(self.rows))]

    def detector_options(self, detector: str) -> dict:
        return {"labels": [a.name for a in self.artists], "template": "a painting by {}"} if detector == "clip" else {}

    def cases(self, concept: str) -> list[Case]:
        target = self.artist(concept)
        erased = self.by_artist[target.name][: self.n]
        if not erased:
            raise SuiteError(f"no prompt of {self.path} names {target.name!r}")
        out = [Case(c.prompt, c.seed, "erased", c.label) for c in erased]
        for a in self.artists:
            if a is not target:
                out += [Case(c.prompt, c.seed, "other", c.label) for c in self.by_artist[a.name][: self.n_locality]]
        return out

    # ---- the concept's words (attacks) -------------------------------------------------------

    def concept_words(self, concept: str) -> list[str]:
        a = self.artist(concept)
        return [*a.aliases, *(f"{alias}'s" for alias in a.aliases)]

    def without_concept(self, concept: str, prompt: str, index: int = 0) -> str:
        """``prompt`` with the artist's names (and possessives) replaced by "an artist"."""
        a = self.artist(concept)
        text = replace_phrases(prompt, [f"{alias}'s" for alias in a.aliases], f"{NEUTRAL}'s")
        return replace_phrases(text, a.aliases, NEUTRAL)

    def content_prompt(self, case: Case) -> str:
        """What the case's image should still show: its prompt without its artist."""
        return case.prompt if case.label is None else self.without_concept(case.label, case.prompt)

    def attack_sets(self, concept: str) -> dict[str, list[Case]]:
        return {"plain": [c for c in self.cases(concept) if c.set == "erased"]}

    def inversion_word(self, concept: str) -> str:
        return "painting"

    # ---- scoring -----------------------------------------------------------------------------

    def _clip_model(self):
        from .clip import ClipModel

        if self._clip is None:
            self._clip = ClipModel.load(self.clip_model_source)
        return self._clip

    def score(self, cases, images, detector, concept) -> dict:
        images = [images[i] for i in range(len(cases))]
        results = detect_all(detector, images, [c.label for c in cases])
        erased = [i for i, c in enumerate(cases) if c.set == "erased"]
        other = [i for i, c in enumerate(cases) if c.set == "other"]
        content_prompts = [self.content_prompt(cases[i]) for i in erased]
        content, clip_scores = content_kept(self._clip_model(), [images[i] for i in erased], content_prompts)
        acc_e = percent([results[i][0] for i in erased])
        acc_l = percent([results[i][0] for i in other])
        per_artist: dict[str, list[bool]] = {}
        for i in other:
            per_artist.setdefault(cases[i].label, []).append(results[i][0])
        records = case_records(cases, results)
        for j, i in enumerate(erased):
            records[i]["content_prompt"] = content_prompts[j]
            records[i]["content_clip_score"] = round(clip_scores[j], 3)
        return {
            "acc_e": acc_e,
            "content": content,
            "content_clip_score": sum(clip_scores) / len(clip_scores) if clip_scores else math.nan,
            "acc_l": acc_l,
            "h": harmonic_mean([100 - acc_e, content, acc_l]),
            "locality_per_artist": {k: percent(v) for k, v in per_artist.items()},
            "n_images": len(cases),
            "cases": records,
        }

    def compare(self, cases, base_images, images) -> dict:
        sets = [c.set for c in cases]
        dist, kind = image_distances(list(base_images), list(images), self.distance, self._clip_model)
        out = {"distance_kind": kind}
        for name in ("erased", "other"):
            d = [float(dist[i]) for i, s in enumerate(sets) if s == name]
            out[f"distance_{name}"] = sum(d) / len(d) if d else math.nan
        return out


def content_kept(clip, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> tuple[float, list[float]]:
    """(% of images whose own prompt is CLIP's best match among ``prompts``, each image's CLIP
    score to its prompt). Images (3, H, W) in [0, 1], one prompt per image; identical prompts
    count as one subject (a match to any copy counts)."""
    if not images:
        return math.nan, []
    img = clip.image_features(list(images))
    txt = clip.text_features(list(prompts))
    sim = img @ txt.T  # (N, N) cosines
    best = sim.argmax(-1)
    hits = [prompts[int(best[i])] == prompts[i] for i in range(len(prompts))]
    own = (100 * sim.diagonal()).clamp(min=0)
    return percent(hits), [float(s) for s in own]


def image_distances(base: list[torch.Tensor], edited: list[torch.Tensor], kind: str, clip_loader):
    """(per-image distances (N,), the kind used): LPIPS where it loads (``kind`` "lpips" must,
    "auto" tries), else 1 - cos of CLIP image embeddings."""
    if len(base) != len(edited):
        raise ValueError(f"{len(base)} base images but {len(edited)} edited ones")
    if kind in ("auto", "lpips"):
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="none")
            d = torch.cat([lpips(b[None].float(), e[None].float()).reshape(1) for b, e in zip(base, edited)])
            return d, "lpips (torchmetrics, alex)"
        except Exception as err:  # torchvision or its weights missing offline
            if kind == "lpips":
                raise SuiteError(f"LPIPS is not available here ({type(err).__name__}); use distance=clip") from None
    clip = clip_loader()
    a, b = clip.image_features(base), clip.image_features(edited)
    return 1 - (a * b).sum(-1), f"1 - cos of CLIP image embeddings ({clip.source})"
