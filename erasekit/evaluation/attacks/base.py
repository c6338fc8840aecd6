"""The attack contract: what an attack is given, what it returns, and the registry of attacks.

An attack is a config class (an :class:`AttackConfig`, checked field by field like a method's
config) and a ``run(ctx, config) -> AttackOutcome`` function, registered under its name with
:func:`register_attack`. The runner (:func:`erasekit.evaluation.attacks.attack`) applies one
edit to the pipeline, builds the :class:`AttackContext` (the suite's plain prompts, the base
model's images of them, which of them the edited model already shows the concept on), calls
``run``, removes the edit, judges nothing itself: the attack returns its own success rate, as
its paper counts it, with the definition in words.

Success rates are percentages in [0, 100]. ``pre`` (the plain prompt on the edited model shows
the concept) comes from one evaluation per prompt, made by the runner before any attack.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import UnknownName
from ...files import atomic_write_bytes
from ...methods.config import MethodConfig, setting
from ..detectors import detect_all
from ..metrics import percent
from ..runner import _png_bytes, as_8bit
from ..suites import Case, Suite


@dataclass
class AttackConfig(MethodConfig):
    """Base of every attack's config: ``seed`` seeds everything random in the attack (its own
    generators; the images are generated at the attacked prompts' own seeds)."""

    seed: int = setting(0, "seed of the attack's random draws", low=0)


@dataclass
class AttackContext:
    """What an attack gets for one edit. The edit is applied to ``pipe`` while ``run`` runs;
    ``adapter.edits_disabled()`` gives the base model.

    ``cases``: the suite's plain prompts for the concept (at most n). ``base_images``: the base
    model's image of each case (or the ``reference`` model's), (3, H, W) in [0, 1], 8-bit levels.
    ``pre``: whether the edited
    model's image of each case shows the concept (no attack). ``folder``: where this attack
    writes its files for this edit. ``steps``: sampler steps for images (None: the model's).
    """

    pipe: Any
    adapter: Any
    concept: str
    suite: Suite
    detector: Any
    label: str
    cases: list[Case]
    base_images: list[Tensor]
    pre: list[bool]
    folder: Path
    steps: int | None = None
    progress: bool = True
    reference: Any = None

    def generate_reference(self, prompts: Sequence[str], cases: Sequence[Case]) -> list[Tensor]:
        """Like :meth:`generate`, on the reference model: ``reference`` (a pipeline whose images
        stand for the concept, e.g. the shipped model when the attacked one never learned it),
        or else this pipeline with every edit off (the base model)."""
        if self.reference is None:
            with self.adapter.edits_disabled():
                return self.generate(prompts, cases)
        from ...models import adapter_for

        ctx = dataclasses.replace(self, pipe=self.reference, adapter=adapter_for(self.reference), reference=None)
        return ctx.generate(prompts, cases)

    def judge(self, images: Sequence[Tensor]) -> list[tuple[bool, float]]:
        """(shows the concept, detector score) per image (3, H, W) in [0, 1]."""
        found = detect_all(self.detector, list(images), [self.concept] * len(images))
        return [(bool(f[0]), float(f[1])) for f in found]

    def generate(self, prompts: Sequence[str], cases: Sequence[Case], batch_size: int = 16) -> list[Tensor]:
        """One image per prompt on the pipeline as it is now, at ``cases[i]``'s seed, guidance
        and size, rounded to 8-bit levels as every scored image is: a list of (3, H, W). Cases
        with the same guidance and size are generated in batches (each image has its own
        generator, so batching does not change an image)."""
        if len(prompts) != len(cases):
            raise ValueError(f"{len(prompts)} prompts but {len(cases)} cases")
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(cases):
            groups.setdefault((c.guidance, c.height, c.width), []).append(i)
        out: list[Tensor | None] = [None] * len(prompts)
        for (guidance, height, width), idx in groups.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                with torch.no_grad():
                    images = self.adapter.generate(
                        [prompts[i] for i in chunk],
                        [cases[i].seed for i in chunk],
                        steps=self.steps,
                        guidance=guidance,
                        height=height,
                        width=width,
                    )
                for i, img in zip(chunk, images):
                    out[i] = as_8bit(img.cpu())
        return out

    def generate_from_conditioning(self, cond, case: Case) -> Tensor:
        """The image of one Conditioning (batch 1) at ``case``'s seed, guidance and size, 8-bit levels."""
        with torch.no_grad():
            img = self.adapter.generate_from_conditioning(
                cond, [case.seed], steps=self.steps, guidance=case.guidance, height=case.height, width=case.width
            )[0]
        return as_8bit(img.cpu())

    def save_image(self, name: str, image: Tensor) -> str:
        """Write ``image`` as ``folder/name`` (PNG); returns the path relative to the attack's
        output folder's parent's parent (the attack run's folder)."""
        path = self.folder / name
        atomic_write_bytes(path, _png_bytes(image))
        return str(path.relative_to(self.folder.parent.parent))


@dataclass
class AttackOutcome:
    """What an attack returns for one edit.

    ``asr``: success rate in %, counted as ``definition`` says. ``records``: one dict per
    attacked prompt or generated image ("prompt", "seed", "detected", "score", "file", and the
    attack's own keys). ``images``: the attack's images in record order, for the report.
    ``figures``: other numbers (pre-ASR, attack-only ASR, the detector budget, losses, seconds).
    ``tensors``: what the attack learned (saved as safetensors beside its images).
    """

    asr: float
    definition: str
    records: list[dict]
    images: list[Tensor]
    figures: dict = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: ``run(ctx, config)``, its config class, the settings ``--quick``
    uses, and the paper it follows (one line)."""

    name: str
    config: type[AttackConfig]
    run: Callable[[AttackContext, AttackConfig], AttackOutcome]
    reference: str
    quick: Mapping[str, Any] = field(default_factory=dict)


ATTACK_SPECS: dict[str, AttackSpec] = {}
# Prompt-set attacks are not run functions: they are the suite's own prompt sets, generated
# with the plain prompts (see the runner).
PROMPT_ATTACKS = ("paraphrase", "synonym")


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add ``spec`` to the registry under its name (names are unique) and name its config."""
    if spec.name in ATTACK_SPECS or spec.name in PROMPT_ATTACKS:
        raise ValueError(f"attack {spec.name!r} is already registered")
    spec.config.method_name = spec.name
    spec.config(**dict(spec.quick))  # the quick settings must make a valid config
    ATTACK_SPECS[spec.name] = spec
    return spec


def attack_names() -> tuple[str, ...]:
    """Every attack name: the prompt-set attacks, then the registered ones in order."""
    return PROMPT_ATTACKS + tuple(ATTACK_SPECS)


def attack_spec(name: str) -> AttackSpec:
    """The registered attack ``name``; UnknownName listing the known ones otherwise."""
    if name not in ATTACK_SPECS:
        raise UnknownName(f"unknown attack {name!r}; known: {', '.join(attack_names())}")
    return ATTACK_SPECS[name]


def make_attack_config(name: str, settings: Mapping[str, Any] | None = None, quick: bool = False) -> AttackConfig:
    """The config of attack ``name``: its defaults, then (with ``quick``) its quick settings,
    then ``settings`` (values, or the text of ``--attack-set NAME.KEY=VALUE``, parsed strictly)."""
    spec = attack_spec(name)
    values: dict[str, Any] = dict(spec.quick) if quick else {}
    for key, value in (settings or {}).items():
        values[key] = spec.config.parse_setting(key, value) if isinstance(value, str) else value
    known = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise spec.config.error(unknown[0], values[unknown[0]], f"one of the settings {', '.join(sorted(known))}")
    return spec.config(**values)


def pre_post_rates(pre: Sequence[bool], post: Sequence[bool | None]) -> dict[str, float]:
    """The UnlearnDiffAtk / AdvUnlearn counting over N prompts: pre-ASR = % pre; ASR = % (pre or
    post) (never above 100); attack-only ASR = % post among the prompts not pre-successful.
    ``post[i]`` is None where the prompt was not attacked (it was pre-successful)."""
    if len(pre) != len(post):
        raise ValueError(f"{len(pre)} pre flags but {len(post)} post flags")
    either = [bool(a) or bool(b) for a, b in zip(pre, post)]
    rest = [bool(b) for a, b in zip(pre, post) if not a]
    return {"pre_asr": percent(pre), "asr": percent(either), "attack_only_asr": percent(rest)}


def ordinary_token_ids(tokenizer) -> list[int]:
    """The ids an attack may draw: every id the tokenizer knows but its special tokens (BOS, EOS,
    pad, unk) and T5's ``<extra_id_*>`` sentinels."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        i
        for i, t in enumerate(tokens)
        if i not in special and t is not None and not re.fullmatch(r"<extra_id_\d+>", t)
    ]
