"""Red-teaming an erasure: can the concept be brought back?

Attacks, one file each (every file registers its attack; see :mod:`.base` for the contract):

- ``paraphrase`` and ``synonym``: the suite's prompt sets that ask for the concept without its
  usual wording (held-out phrasings, synonyms, indirect mentions).
- ``soft-prompt`` (soft_prompt.py): continuous token embeddings before the prompt, optimised on
  the edited model (a continuous UnlearnDiffAtk).
- ``textual-inversion`` (textual_inversion.py): a new token's input embedding learned on the
  edited model from images of the concept (Pham et al., ICLR 2024).
- ``ring-a-bell`` (ring_a_bell.py): a discrete prompt found by a genetic search in the text
  encoder's output space, without the edited model (Tsai et al., ICLR 2024).
- ``unlearndiffatk`` (unlearndiffatk.py): discrete prompt tokens optimised on the edited model
  against the base model's image (Zhang et al., ECCV 2024).

:func:`attack` runs them on edits and writes ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from safetensors.torch import save as save_safetensors

from ...errors import UnknownName
from ...files import atomic_write_bytes, atomic_write_text
from ..detectors import describe, detect_all
from ..evaluate import generate_runs, json_safe, resolve_detector, resolve_edits, resolve_suite, write_json
from ..metrics import percent
from ..records import edit_record, library_versions, model_record
from ..runner import process_state
from ..suites import Suite
from .base import (
    ATTACK_SPECS,
    PROMPT_ATTACKS,
    AttackConfig,
    AttackContext,
    AttackOutcome,
    AttackSpec,
    attack_names,
    attack_spec,
    make_attack_config,
    pre_post_rates,
    register_attack,
)
from .report import attack_report

# Importing an attack's module registers it; the order is the order of the tables.
for _module in ("soft_prompt", "textual_inversion", "ring_a_bell", "unlearndiffatk"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _err:  # an attack not written yet
        if _err.name != f"{__name__}.{_module}":
            raise

from .soft_prompt import SoftPrompt, SoftPromptConfig, soft_prompt_attack  # noqa: E402

ATTACKS = attack_names()
DEFAULT_ATTACKS = ("paraphrase", "synonym", "soft-prompt")

__all__ = [
    "ATTACKS",
    "ATTACK_SPECS",
    "DEFAULT_ATTACKS",
    "PROMPT_ATTACKS",
    "AttackConfig",
    "AttackContext",
    "AttackOutcome",
    "AttackSpec",
    "SoftPrompt",
    "SoftPromptConfig",
    "attack",
    "attack_names",
    "attack_spec",
    "make_attack_config",
    "pre_post_rates",
    "register_attack",
    "soft_prompt_attack",
]


def attack(
    pipe,
    suite: str | Suite,
    concept: str,
    edits=(),
    out: str | Path = "erasekit-attack",
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    detector=None,
    detector_model: str | None = None,
    threshold=None,
    n: int | None = None,
    configs: Mapping[str, AttackConfig | Mapping] | None = None,
    quick: bool = False,
    soft_prompt: SoftPromptConfig | None = None,
    batch_size: int = 16,
    steps: int | None = None,
    model: str | None = None,
    suite_options: dict | None = None,
    include_base: bool = False,
    reference=None,
    progress: bool = True,
) -> dict | None:
    """Attack each of ``edits`` (Edit objects or folders) on ``pipe`` with ``attacks`` for
    ``concept``; write ``out``/results.json and ``out``/report.html; return the results.

    Every run generates the suite's plain prompts (at most ``n``) on the base model and on each
    edit, so the report shows the concept's rate without attack beside each attack's success
    rate. Prompt attacks generate the suite's paraphrase / synonym prompts (at most ``n`` each).
    Every other attack runs its registered function once per edit, with the edit applied.
    ``configs``: attack name -> its config, or the settings to make it from (text as
    ``--attack-set`` gives it); ``quick`` starts from each attack's quick settings.
    ``soft_prompt`` is the soft-prompt attack's config (the same as ``configs["soft-prompt"]``).
    ``include_base``: run the attacks on the unedited model too (row "base"): the rate an attack
    reaches where nothing was erased, the check that the attack works at all. ``reference``: a
    pipeline whose images of the plain prompts stand for the concept in the attacks (their
    targets and training images) instead of ``pipe``'s own: the shipped model when ``pipe`` is
    one retrained without the concept (an oracle).
    Success rates are % in [0, 100]. Returns None on processes other than the main one.
    """
    start = time.time()
    attacks = list(dict.fromkeys(attacks))
    for a in attacks:
        if a not in PROMPT_ATTACKS:
            attack_spec(a)
    configs = dict(configs or {})
    if soft_prompt is not None:
        configs["soft-prompt"] = soft_prompt
    for name in configs:
        if name not in attacks:
            raise UnknownName(f"settings given for attack {name!r}, which is not run ({', '.join(attacks)})")
    configs = {
        a: c if isinstance(c, AttackConfig) else make_attack_config(a, c, quick=quick) for a, c in configs.items()
    }
    configs |= {a: make_attack_config(a, quick=quick) for a in attacks if a not in PROMPT_ATTACKS and a not in configs}
    suite = resolve_suite(suite, suite_options)
    sets = suite.attack_sets(concept)
    for a in attacks:
        if a in PROMPT_ATTACKS and not sets.get(a):
            available = [x for x in attack_names() if x not in PROMPT_ATTACKS or sets.get(x)]
            raise ValueError(
                f"the {suite.name} suite has no {a} prompts for {concept!r}; attacks available: {', '.join(available)}"
            )
    edits = resolve_edits(edits)
    if not edits and not include_base:
        raise ValueError("attack needs at least one edit to attack (or include_base)")
    detector = resolve_detector(suite, detector, detector_model, threshold)
    if detector is None:
        raise ValueError(f"the {suite.name} suite has no detector to judge attacks: pass one")
    out = Path(out)
    names = ["plain"] + [a for a in attacks if a in PROMPT_ATTACKS]
    cases = [replace(c, set=name) for name in names for c in sets[name][:n]]
    runs = generate_runs(pipe, cases, out, edits, [1.0], batch_size, steps, progress)
    if not process_state().is_main_process:
        return None
    for run in runs:
        found = detect_all(detector, [run["images"][i] for i in range(len(cases))], [concept] * len(cases))
        run["detected"] = [f[0] for f in found]
        run["rates"] = {name: percent([d for d, c in zip(run["detected"], cases) if c.set == name]) for name in names}
    plain_idx = [i for i, c in enumerate(cases) if c.set == "plain"]
    plain = [cases[i] for i in plain_idx]
    base_images = [runs[0]["images"][i] for i in plain_idx]
    if reference is not None:  # the attacks' targets come from the reference model
        ref = generate_runs(reference, plain, out, [], [1.0], batch_size, steps, progress, folder_name="reference")[0]
        base_images = [ref["images"][i] for i in range(len(plain))]
    outcomes: dict[str, dict[str, AttackOutcome]] = {}
    seconds: dict[str, dict[str, float]] = {}
    run_attacks = [a for a in attacks if a not in PROMPT_ATTACKS]
    if run_attacks:
        from ...edits import apply, remove
        from ...models import adapter_for

        adapter = adapter_for(pipe)
        targets = ([(None, "base", runs[0])] if include_base else []) + [
            (e["edit"], e["label"], run) for e, run in zip(edits, runs[1:])
        ]
        for edit, label, run in targets:
            pre = [run["detected"][i] for i in plain_idx]
            for name in run_attacks:
                folder = out / name / label
                ctx = AttackContext(
                    pipe,
                    adapter,
                    concept,
                    suite,
                    detector,
                    label,
                    plain,
                    base_images,
                    pre,
                    folder,
                    steps,
                    progress,
                    reference,
                )
                began = time.time()
                if edit is not None:
                    apply(pipe, edit, scale=1.0)
                try:
                    outcome = ATTACK_SPECS[name].run(ctx, configs[name])
                finally:
                    if edit is not None:
                        remove(pipe, edit)
                seconds.setdefault(name, {})[label] = round(time.time() - began, 1)
                if outcome.tensors:
                    tensors = {k: v.detach().cpu().contiguous() for k, v in outcome.tensors.items()}
                    data = save_safetensors(tensors, metadata={"attack": name, "concept": concept})
                    atomic_write_bytes(folder / f"{name}.safetensors", data)
                outcomes.setdefault(name, {})[label] = outcome
    results = {
        "kind": "attack",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "concept": concept,
        "model": model_record(pipe, model),
        "reference": model_record(reference, None) if reference is not None else None,
        "suite": suite.record()
        | {"n_cases": len(cases), "sets": {name: sum(c.set == name for c in cases) for name in names}},
        "detector": describe(detector),
        "edits": [edit_record(e["edit"], e["path"]) | {"label": e["label"]} for e in edits],
        "attacks": list(attacks),
        "configs": {a: asdict(configs[a]) for a in run_attacks},
        "references": {a: ATTACK_SPECS[a].reference for a in run_attacks},
        "soft_prompt": asdict(configs["soft-prompt"]) if "soft-prompt" in attacks else None,
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
        "attack_results": {
            name: {
                label: {
                    "asr": o.asr,
                    "definition": o.definition,
                    "figures": o.figures,
                    "seconds": seconds[name][label],
                    "cases": o.records,
                }
                for label, o in per_edit.items()
            }
            for name, per_edit in outcomes.items()
        },
    }
    results["asr"] = {
        r["label"]: {"no attack": r["rates"]["plain"]}
        | {a: r["rates"][a] for a in attacks if a in PROMPT_ATTACKS}
        | {a: outcomes[a][r["label"]].asr for a in run_attacks if r["label"] in outcomes.get(a, {})}
        for r in runs
    }
    if "soft-prompt" in outcomes:  # the earlier name of the soft-prompt attack's results
        results["soft_prompt_results"] = {
            k: {"asr": v["asr"], "cases": v["cases"]} for k, v in results["attack_results"]["soft-prompt"].items()
        }
    results["seconds"] = round(time.time() - start, 1)
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.html", attack_report(results, cases, runs, outcomes, plain_idx, suite))
    return json_safe(results)
