"""The ``erasekit`` command line: argument parsing and printing only; the library does the work."""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import shlex
import signal
import sys
from pathlib import Path

from .errors import UserError


def _toyworld_train(args: argparse.Namespace) -> int:
    if args.family == "detector":
        from .toyworld.detector import train_detector

        accuracy = train_detector(args.out, seed=0 if args.seed is None else args.seed)
        print("test accuracy on fresh renders: " + ", ".join(f"{h} {100 * a:.2f}%" for h, a in accuracy.items()))
        return 0
    from .methods import split_list
    from .toyworld.train import TrainConfig, like_shipped, train

    exclude = tuple(split_list(args.exclude or ""))
    if args.like_shipped:
        cfg = like_shipped(args.family, args.out, exclude, args.threads, seed=args.seed)
        path = train(cfg)
        print(f"saved {cfg.family} to {path}")
        return 0
    cfg = TrainConfig(
        family=args.family,
        out=args.out,
        seed=0 if args.seed is None else args.seed,
        steps=args.steps,
        vae_steps=args.vae_steps,
        dataset_size=args.dataset_size,
        batch_size=args.batch_size,
        lr=args.lr,
        vae=args.vae,
        threads=args.threads,
        train_text_encoders=args.text_encoders == "train",
        canonical_steps=args.canonical_steps,
        canonical_share=args.canonical_share,
        snapshot_every=args.snapshot_every,
        exclude=exclude,
    )
    path = train(cfg)
    print(f"saved {cfg.family} to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    method = None if args.method == "none" else args.method
    result = run_demo(
        args.out, concept=args.concept, n=args.n, method=method, preset=args.preset, overrides=_parse_sets(args.set)
    )
    print(f"erasing '{result['concept']}' on the toy pipelines (detector: {result['detector']['name']})")
    for family, entry in result["families"].items():
        for label in ("base", "edited"):
            if label in entry:
                r = entry[label]
                name = "base" if label == "base" else f"{method}"
                print(
                    f"  {family:5s} {name:10s} Acc_E {r['acc_e']:5.1f}  Acc_R {r['acc_r']:5.1f}  "
                    f"Acc_L {r['acc_l']:5.1f}  H {r['h']:5.1f}"
                )
        if "warning" in entry:
            print(f"  {family:5s} warning: {entry['warning']}")
    print(f"wrote {args.out}/index.html and {args.out}/results.json in {result['seconds']:.0f} s")
    return 0


def _bench_toy(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .bench import run_bench
    from .methods import split_list

    def show(row: dict) -> None:
        where = f"{row['model']:5s} {row['concept']:9s} {row['method']:15s}"
        if "error" in row:
            tqdm.write(f"{where} FAILED: {row['error']}")
            return
        fit = f"  fit {row['fit_seconds']:.1f} s, +{row['fit_peak_mb']:.0f} MiB" if "fit_seconds" in row else ""
        seed = f" seed {row['seed']}" if row.get("seed") is not None and args.seeds else ""
        tuning = " (tuning)" if row.get("phase") == "tune" else ""
        attacked = "".join(f"  {a} {v:5.1f}" for a, v in row.get("attacks", {}).items())
        worst = f"  worst H {row['worst_h']:5.1f}" if row.get("attacks") else ""
        tqdm.write(
            f"{where}{seed}{tuning} Acc_E {row['acc_e']:5.1f}  Acc_R {row['acc_r']:5.1f}  Acc_L {row['acc_l']:5.1f}  "
            f"H {row['h']:5.1f}{attacked}{worst}{fit}"
        )

    overrides: dict[str, dict[str, str]] = {}
    for key, value in _parse_sets(args.set).items():
        method, dot, setting = key.partition(".")
        if not dot or not method or not setting:
            raise UserError(f"bench --set expects method.key=value (e.g. receler.iterations=50), got {key!r}")
        overrides.setdefault(method, {})[setting] = value
    optional = {"methods": split_list(args.methods)} if args.methods else {}
    try:
        seeds = [int(x) for x in split_list(args.seeds)] if args.seeds else None
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    attack_configs = parse_attack_set(args.attack_set)
    result = run_bench(
        models=split_list(args.models),
        **optional,
        concepts=split_list(args.concepts) if args.concepts else None,
        preset=args.preset,
        overrides=overrides,
        n=args.n,
        n_locality=args.n_locality,
        quick=args.quick,
        out=args.out,
        device=args.device,
        command="erasekit " + shlex.join(a for a in args.argv if a != "--report-only"),
        on_row=show,
        seeds=seeds,
        attacks=split_list(args.attacks) if args.attacks else (),
        attack_n=args.attack_n,
        attack_configs=attack_configs,
        tune=args.tune,
        dev_concept=args.dev_concept,
        oracles=None if args.oracles.lower() == "none" else args.oracles,
        report_only=args.report_only,
    )
    from .bench import MD_FILE, markdown

    print()
    print(markdown(result).split("\n\nPer concept:")[0])
    if result["skipped"]:
        print(f"{result['skipped']} rows were already in {args.out} and were not run again")
    print(f"wrote {args.out}/{MD_FILE}, {args.out}/bench.json and {args.out}/report.html")
    return 1 if result["errors"] else 0


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _erase(args: argparse.Namespace) -> int:
    from .edits import check_edit_output
    from .methods import erase, make_config, method_help

    if args.help_method:
        print(method_help(args.help_method))
        return 0
    import torch

    from .models import load_pipeline

    check_edit_output(args.out, overwrite=args.overwrite)  # before any training
    config = make_config(args.method, args.preset, _parse_sets(args.set))  # bad settings: refused before loading
    _check_model_and_edits(args.model, [])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, dtype=getattr(torch, args.dtype), device=device)
    edit = erase(pipe, args.concept, args.method, config, checkpoint_dir=args.checkpoint_dir)
    edit.base_model = args.model
    edit.save(args.out, overwrite=args.overwrite)
    print(
        f"saved {args.method} edit for '{args.concept}' to {args.out} "
        f"({edit.metrics.get('train_seconds')} s of training)"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .export import export

    _check_model_and_edits(args.model, [args.edit])
    if args.threads:
        torch.set_num_threads(args.threads)
    record = export(
        args.edit,
        args.model,
        format=args.format,
        out=args.out,
        rank=args.rank,
        distill_rank=args.distill_rank,
        distill_into=args.distill_into,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    err = record.get("relative_error", 0.0)
    print(f"exported {record['edit']['method']} edit as {args.format}: {', '.join(record['files'])}")
    print(f"approximation: {record['approximation']}; relative error {err:.4f}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .edits import apply, load_edit
    from .evaluation.generation import generate_images
    from .evaluation.report import image_grid
    from .files import atomic_write_bytes
    from .models import adapter_for, load_pipeline

    if args.n < 1:
        raise UserError(f"--n must be at least 1 (images per prompt), got {args.n}")
    if Path(args.out).suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--out {args.out} needs an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; name an image file")
    if Path(args.out).exists() and not args.overwrite:
        raise UserError(f"--out {args.out} already exists; pass --overwrite to replace it")
    if not math.isfinite(args.scale):
        raise UserError(f"--scale must be a finite number, got {args.scale}")
    _check_model_and_edits(args.model, args.edit)
    edits = [load_edit(folder) for folder in args.edit]  # every edit checked before the model loads
    pipe = load_pipeline(args.model)
    for edit in edits:
        apply(pipe, edit, scale=args.scale)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    seeds = [args.seed + i for _ in args.prompt for i in range(args.n)]
    images = generate_images(adapter_for(pipe), prompts, seeds)
    grid = image_grid(images, cols=args.n, scale=4 if images.shape[-1] <= 64 else 1)
    buffer = io.BytesIO()
    grid.save(buffer, format=Image.registered_extensions()[Path(args.out).suffix.lower()])
    atomic_write_bytes(args.out, buffer.getvalue())  # an interrupted write leaves no half image
    print(
        f"wrote {len(images)} images to {args.out} "
        f"(rows: prompts; columns: seeds {args.seed}..{args.seed + args.n - 1})"
    )
    return 0


def _suite_options(args: argparse.Namespace) -> dict:
    """The suite options given on the command line (only those set)."""
    given = {
        "prompts": args.prompts,
        "paraphrases": args.paraphrases,
        "n": args.n,
        "clip_model": getattr(args, "clip_model", None),
        "fid_features": getattr(args, "fid_features", None),
        "reference": getattr(args, "fid_reference", None),
        "csv_size": False if getattr(args, "model_size", False) else None,
        "artists": getattr(args, "artists", None),
        "distance": getattr(args, "distance", None),
    }
    return {k: v for k, v in given.items() if v is not None} | ({"quick": True} if args.quick else {})


def _threshold(text: str | None) -> float | str | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _load_for_evaluation(args: argparse.Namespace):
    from .evaluation.runner import process_state
    from .models import load_pipeline

    # Under `accelerate launch` every process takes its own device.
    device = args.device or process_state().device
    return load_pipeline(args.model, device=device)


def _scales(text: str) -> list[float]:
    """``--scales 0.5,1`` as finite floats; a UserError naming the bad entry otherwise."""
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"--scales takes comma-separated finite numbers (e.g. 0.5,1), got {part.strip()!r}")
        out.append(value)
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from .evaluation.evaluate import evaluate
    from .evaluation.lock import output_lock
    from .evaluation.runner import process_state
    from .evaluation.suites import make_suite

    scales = _scales(args.scales)
    # Bad prompt files, suite options and a busy --out are refused before the model loads.
    suite = make_suite(args.suite, **_suite_options(args))
    suite.cases(args.concept)
    if args.edit:
        _check_model_and_edits(args.model, args.edit)
    main_process = process_state().is_main_process
    with output_lock(args.out, "erasekit evaluate") if main_process else nullcontext():
        results = evaluate(
            _load_for_evaluation(args),
            suite,
            args.concept,
            edits=args.edit,
            out=args.out,
            detector=args.detector,
            detector_model=args.detector_model,
            threshold=_threshold(args.threshold),
            scales=scales,
            batch_size=args.batch_size,
            steps=args.steps,
            model=args.model,
        )
    if results is None:  # not the main process
        return 0
    det = results["detector"]
    print(
        f"{results['suite']['name']}: '{args.concept}' on {args.model}, {results['suite']['n_cases']} prompts per run"
        + (f", detector {det['name']} (threshold {det['threshold']})" if det else "")
    )
    for run in results["runs"]:
        shown = {k: v for k, v in run["metrics"].items() if isinstance(v, (int, float)) and k not in ("n_images",)}
        print(
            f"  {run['name']:18s} "
            + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        )
    print(f"wrote {args.out}/results.json and {args.out}/report.html in {results['seconds']:.0f} s")
    return 0


def _attack(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from .evaluation.lock import output_lock
    from .evaluation.runner import process_state

    with output_lock(args.out, "erasekit attack") if process_state().is_main_process else nullcontext():
        return _attack_locked(args)


def parse_attack_set(items: list[str]) -> dict[str, dict[str, str]]:
    """Attack name -> {setting: text} from ``--attack-set ATTACK.KEY=VALUE`` items; a malformed
    item is a ConfigError."""
    from .errors import ConfigError

    settings: dict[str, dict[str, str]] = {}
    for item in items:
        head, eq, value = item.partition("=")
        name, dot, key = head.rpartition(".")
        if not eq or not dot or not name or not key:
            raise ConfigError(f"--attack-set takes ATTACK.KEY=VALUE, got {item!r}")
        settings.setdefault(name.strip(), {})[key.strip()] = value.strip()
    return settings


def attack_settings(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, str]]:
    """Attack name -> {setting: text} from --attack-set ATTACK.KEY=VALUE, the soft-prompt flags and
    --attack-seed (for every attack run)."""
    settings = parse_attack_set(args.attack_set)
    soft = {"tokens": args.tokens, "steps": args.attack_steps, "lr": args.lr}
    for key, value in soft.items():
        if value is not None and "soft-prompt" in names:
            settings.setdefault("soft-prompt", {})[key] = str(value)
    if args.attack_seed is not None:
        for name in names:
            settings.setdefault(name, {})["seed"] = str(args.attack_seed)
    return settings


def _attack_locked(args: argparse.Namespace) -> int:
    from .evaluation.attacks import ATTACKS, PROMPT_ATTACKS, attack, make_attack_config

    names = ATTACKS if args.attacks.strip() == "all" else [a.strip() for a in args.attacks.split(",") if a.strip()]
    run = [a for a in names if a not in PROMPT_ATTACKS]
    settings = attack_settings(args, run)
    for name in run:  # unknown attacks and bad settings fail before any model loads
        make_attack_config(name, settings.get(name), quick=args.quick)
    _check_model_and_edits(args.model, args.edit)
    pipe = _load_for_evaluation(args)
    quick = args.quick
    results = attack(
        pipe,
        args.suite,
        args.concept,
        edits=args.edit,
        out=args.out,
        attacks=names,
        detector=args.detector,
        detector_model=args.detector_model,
        threshold=_threshold(args.threshold),
        n=args.n or (4 if quick else None),
        configs=settings,
        quick=quick,
        batch_size=args.batch_size,
        steps=args.steps,
        model=args.model,
        suite_options=_suite_options(args),
    )
    if results is None:
        return 0
    print(
        f"attacks on '{args.concept}' ({results['suite']['name']}, detector {results['detector']['name']}): "
        "success rate in %"
    )
    for label, rates in results["asr"].items():
        print(
            f"  {label:14s} "
            + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} n/a" for k, v in rates.items())
        )
    print(f"wrote {args.out}/results.json and {args.out}/report.html in {results['seconds']:.0f} s")
    return 0


def _model_help() -> str:
    from .registry import PIPELINES

    return "pipeline folder, hub id, or a pipeline name: " + ", ".join(PIPELINES.names())


def _add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    from .registry import DETECTORS, SUITES

    p.add_argument("--model", required=True, help=_model_help())
    p.add_argument("--suite", required=True, help=", ".join(SUITES.names()))
    p.add_argument(
        "--concept",
        required=True,
        help="the erased concept (an object class, a toy attribute such as striped, or nudity)",
    )
    p.add_argument("--out", required=True, help="folder for results.json, report.html and the images")
    p.add_argument(
        "--prompts",
        default=None,
        help="the suite's prompt CSV (objects: simple prompts; i2p-nudity: the I2P CSV; coco: captions; "
        "styles: artist prompts)",
    )
    p.add_argument("--paraphrases", default=None, help="objects suite: paraphrased prompts CSV")
    p.add_argument(
        "--artists",
        default=None,
        help="styles suite: comma-separated artists, each 'Name|alias|...' (default: the ESD art prompts' artists)",
    )
    p.add_argument(
        "--distance", default=None, choices=("auto", "lpips", "clip"), help="styles suite: distance to base images"
    )
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="prompts per set (toy-objects, toy-styles, toy-colors, objects) or rows (i2p-nudity, coco)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a first look")
    p.add_argument("--detector", default=None, help=", ".join(DETECTORS.names()) + " (default: the suite's)")
    p.add_argument("--detector-model", default=None, help="detector weights: local folder or hub id")
    p.add_argument("--threshold", default=None, help="detector decision threshold (default: the detector's)")
    p.add_argument("--model-size", action="store_true", help="i2p-nudity: the model's image size instead of the CSV's")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--device", default=None, help="default: the accelerate process's device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _require(parser: argparse.ArgumentParser, *names: str, unless: str):
    """A check for main(): the options ``names`` are required unless option ``unless`` is given."""

    def check(args: argparse.Namespace) -> None:
        if getattr(args, unless.lstrip("-").replace("-", "_")) is None:
            missing = [n for n in names if getattr(args, n.lstrip("-").replace("-", "_")) is None]
            if missing:
                parser.error(f"the following arguments are required: {', '.join(missing)} (unless {unless} is given)")

    return check


def build_parser() -> argparse.ArgumentParser:
    """The ``erasekit`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="erasekit", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="raise user errors (bad settings, refused outputs) with their traceback; show debug log messages",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    er = sub.add_parser("erase", help="train an erasure and save it as an Edit folder")
    er.add_argument(
        "--method",
        default="receler",
        help="receler, eraseanything, esd (or esd-x / esd-u), uce, keyword_zeroing, sld, mace, rece, advunlearn, "
        "safree",
    )
    er.add_argument(
        "--help-method",
        metavar="NAME",
        default=None,
        help="print method NAME's settings (type, allowed values, value in each preset, help) and exit",
    )
    er.add_argument("--model", default=None, help=_model_help() + " (required)")
    er.add_argument("--concept", default=None, help="the concept to erase (required)")
    er.add_argument(
        "--out",
        default=None,
        help="Edit folder to write (new or empty; an earlier edit folder with --overwrite) (required)",
    )
    er.add_argument(
        "--overwrite", action="store_true", help="replace the edit folder --out if it already holds an edit"
    )
    er.add_argument("--preset", default="paper", help="paper (the paper's hyper-parameters) or fast (toy world)")
    er.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. --set iterations=100"
    )
    er.add_argument("--checkpoint-dir", default=None, help="save checkpoints here and resume from them")
    er.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    er.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights of the pipeline (bfloat16 for FLUX.1 on one GPU); trained tensors stay float32",
    )
    er.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    er.set_defaults(func=_erase, check=_require(er, "--model", "--concept", "--out", unless="--help-method"))

    gen = sub.add_parser("generate", help="generate images, optionally with edits applied")
    gen.add_argument("--model", required=True, help=_model_help())
    gen.add_argument("--prompt", action="append", required=True)
    gen.add_argument("--edit", action="append", default=[], help="Edit folder(s) to apply")
    gen.add_argument("--scale", type=float, default=1.0, help="strength of the applied edits")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--n", type=int, default=4, help="images per prompt (seeds seed..seed+n-1)")
    gen.add_argument("--out", default="images.png", help="image grid to write (.png, .jpg, .jpeg, .webp)")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if the file exists")
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    gen.set_defaults(func=_generate)

    demo = sub.add_parser("demo", help="the toy world end to end: samples and the erasure suite, as an HTML page")
    demo.add_argument("--out", default="erasekit-demo", help="output folder (index.html, results.json)")
    demo.add_argument("--concept", default="triangle", help="toy-world object to evaluate")
    demo.add_argument("--n", type=int, default=12, help="prompts per suite set")
    demo.add_argument(
        "--method",
        default="esd-u",
        help="erasure method or bench row to show (esd-u, receler, uce, ...), or 'none' for the unedited models",
    )
    demo.add_argument("--preset", default="fast", help="the method's preset (fast: the toy-world one; paper)")
    demo.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting of the method"
    )
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmark every erasure method on the same prompts, seeds and detector")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bt = bench_sub.add_parser(
        "toy", help="every method on the toy pipelines: Acc_E, Acc_R, Acc_L, H, fit time, peak memory"
    )
    bt.add_argument(
        "--models",
        "--families",
        default="toy:sd,toy:flux",
        help="comma-separated: sd, flux (the toy pipelines) or pipeline folders",
    )
    bt.add_argument(
        "--methods",
        default=None,
        help="comma-separated rows (default all: receler, eraseanything, esd-x, esd-u, uce, keyword_zeroing, sld, "
        "mace, rece, advunlearn, safree); the unedited row (and oracle rows) always run, so 'base' alone runs "
        "only them",
    )
    bt.add_argument(
        "--concepts",
        default=None,
        help="comma-separated toy objects and attributes, each with its suite: objects (toy-objects), textures such "
        "as striped (toy-styles), colours such as red (toy-colors) (default circle,triangle,heart)",
    )
    bt.add_argument("--preset", default="fast", help="every method's preset (fast: the toy-world one; paper)")
    bt.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override a setting of a method (esd.lr=...) or of one row (esd-u.lr=...)",
    )
    bt.add_argument("--n", type=int, default=None, help="prompts per suite set (default 24; 2 with --quick)")
    bt.add_argument(
        "--n-locality",
        type=int,
        default=None,
        help="locality prompts per other object, or per name of each other attribute value (default 8; --quick 1)",
    )
    bt.add_argument(
        "--quick", action="store_true", help="a smoke run in minutes: tiny suite, one concept, fewest iterations"
    )
    bt.add_argument(
        "--out",
        default="erasekit-bench",
        help="output folder (bench.json, bench.md, rows.jsonl); a rerun skips its finished rows",
    )
    bt.add_argument(
        "--seeds",
        default=None,
        help="comma-separated training seeds: each method is trained once per seed, the table gives mean ± std",
    )
    bt.add_argument(
        "--attacks",
        default=None,
        help="comma-separated attacks run on every edit after its suite (paraphrase, synonym, soft-prompt, ...); "
        "adds a column per attack and the worst-case H that orders the table",
    )
    bt.add_argument("--attack-n", type=int, default=None, help="prompts per attack set (default 4; 1 with --quick)")
    bt.add_argument(
        "--attack-set",
        action="append",
        default=[],
        metavar="ATTACK.KEY=VALUE",
        help="an attack's setting, e.g. soft-prompt.steps=20 (repeatable)",
    )
    bt.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write bench.json / bench.md / report.html from the rows already in --out, "
        "listing those not yet run (e.g. while other processes on the same --out run them)",
    )
    bt.add_argument(
        "--tune",
        action="store_true",
        help="pick each method's setting from its small grid by worst-case H on --dev-concept, then run the concepts",
    )
    bt.add_argument(
        "--dev-concept",
        default="square",
        help="--tune's development concept (default square); must not be one of --concepts",
    )
    bt.add_argument(
        "--oracles",
        default="benchmarks/oracles",
        help="folder of pipelines retrained without a concept, LABEL-no-CONCEPT (an oracle row and gaps to it "
        "where one exists; default benchmarks/oracles; none: no oracle rows)",
    )
    bt.add_argument("--device", default="cpu")
    bt.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bt.set_defaults(func=_bench_toy)

    ev = sub.add_parser(
        "evaluate", help="run an evaluation suite on the base model and edited ones: results.json + report.html"
    )
    _add_evaluation_arguments(ev)
    ev.add_argument(
        "--edit", action="append", default=[], help="Edit folder(s) to evaluate (each one a method in the report)"
    )
    ev.add_argument(
        "--scales", default="1", help="comma-separated edit scales, e.g. 0.5,1 (the erasure-vs-scale curve)"
    )
    ev.add_argument(
        "--clip-model", default=None, help="coco, styles: CLIP for the CLIP score and content (folder or hub id)"
    )
    ev.add_argument("--fid-features", default=None, help="coco: FID features, inception:WEIGHTS_FILE or clip:FOLDER")
    ev.add_argument("--fid-reference", default=None, help="coco: folder of real images for FID")
    ev.set_defaults(func=_evaluate)

    from .evaluation.attacks import ATTACKS, DEFAULT_ATTACKS

    at = sub.add_parser(
        "attack",
        help="red-team edits: prompt-set, soft-prompt, textual-inversion, ... attacks, success rates + report",
    )
    _add_evaluation_arguments(at)
    at.add_argument("--edit", action="append", required=True, help="Edit folder(s) to attack")
    at.add_argument(
        "--attacks", default=",".join(DEFAULT_ATTACKS), help="comma-separated, or all: " + ", ".join(ATTACKS)
    )
    at.add_argument(
        "--attack-set",
        action="append",
        default=[],
        metavar="ATTACK.KEY=VALUE",
        help="an attack's setting, e.g. textual-inversion.steps=300 (repeatable; a wrong key lists the settings)",
    )
    at.add_argument("--tokens", type=int, default=None, help="soft-prompt tokens (default 5; --quick 3)")
    at.add_argument(
        "--attack-steps", type=int, default=None, help="soft-prompt optimisation steps (default 40; --quick 10)"
    )
    at.add_argument(
        "--lr", type=float, default=None, help="soft-prompt step size, relative to the token embeddings' scale"
    )
    at.add_argument("--attack-seed", type=int, default=None, help="seed of every attack (default 0)")
    at.set_defaults(func=_attack)

    from .export import DISTILL_INTO, FORMATS

    ex = sub.add_parser(
        "export", help="write an edit as files other tools load: diffusers LoRA, kohya (A1111 / ComfyUI), merged model"
    )
    ex.add_argument("edit", help="Edit folder to export")
    ex.add_argument("--model", required=True, help=_model_help() + " (the edit's base model)")
    ex.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="diffusers-lora (folder), kohya (one .safetensors), merged (pipeline folder; SD: + one A1111 checkpoint)",
    )
    ex.add_argument(
        "--out", required=True, help="folder (diffusers-lora, merged) or .safetensors file (kohya) to write"
    )
    ex.add_argument("--rank", type=int, default=64, help="LoRA rank of a weight-delta edit (ESD, UCE): truncated SVD")
    ex.add_argument(
        "--distill-rank", type=int, default=16, help="LoRA rank a Receler edit (erasers) is distilled into"
    )
    ex.add_argument(
        "--distill-into",
        default="prompt-keys-values",
        choices=tuple(DISTILL_INTO),
        help="where a Receler edit's LoRA goes: the prompt's keys and values (end-to-end fit, default), the "
        "attention output projections (per-layer fit), or both (end-to-end fit)",
    )
    ex.add_argument(
        "--dtype",
        default=None,
        choices=("fp16", "bf16", "fp32"),
        help="merged checkpoint's weights (default: as loaded)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    ex.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ex.set_defaults(func=_export)

    toy = sub.add_parser("toyworld", help="the embedded toy text-to-image world")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    tr = toy_sub.add_parser("train", help="train a toy-world pipeline from scratch")
    tr.add_argument("--family", required=True, choices=["sd", "flux", "vae", "detector"])
    tr.add_argument("--out", required=True, help="folder to write the pipeline to")
    tr.add_argument(
        "--seed", type=int, default=None, help="training seed (default 0; with --like-shipped, the recorded one)"
    )
    tr.add_argument("--steps", type=int, default=4000)
    tr.add_argument("--vae-steps", type=int, default=1500)
    tr.add_argument("--dataset-size", type=int, default=24_000)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--vae", default=None, help="reuse the autoencoder in this folder instead of training one")
    tr.add_argument(
        "--text-encoders",
        choices=("train", "freeze"),
        default="train",
        help="train the text encoders with the denoiser (default) or keep them frozen at random init",
    )
    tr.add_argument(
        "--canonical-steps",
        type=int,
        default=0,
        help="caption curriculum: the first N steps use only canonical captions (one word order)",
    )
    tr.add_argument(
        "--canonical-share",
        type=float,
        default=0.0,
        help="share of canonical captions after the curriculum's first stage (0-1)",
    )
    tr.add_argument(
        "--snapshot-every", type=int, default=1000, help="save a -snapshot folder every N steps (0: never)"
    )
    tr.add_argument(
        "--exclude",
        default=None,
        metavar="OBJECT[,OBJECT]",
        help="objects the model never sees: never drawn, never named (word, synonyms, indirect mentions)",
    )
    tr.add_argument(
        "--like-shipped",
        action="store_true",
        help="every other setting (seed, steps, curriculum, autoencoder) as the shipped pipeline of --family recorded"
        " in its training.json (sd, flux); the other flags except --seed are ignored",
    )
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tr.set_defaults(func=_toyworld_train)
    return parser


def busy_machine_warning(threads: int, cores: int | None, others: int) -> str | None:
    """The warning for ``threads`` torch threads on ``cores`` cores while ``others`` threads of
    other processes are running, or None: torch's threads spin while they wait for each other, so
    more threads than free cores can run many times slower than one (measured: a toy ESD
    iteration 48 s on 2 threads beside a 1-thread job, 0.5 s alone)."""
    if not cores or threads <= 1:
        return None
    free = max(1, cores - others)
    if threads <= free:
        return None
    return (
        f"the machine is busy ({others} other running threads on {cores} cores): torch's {threads} threads "
        f"would oversubscribe it and can run many times slower; pass --threads {free}"
    )


def running_elsewhere(samples: int = 5, pause: float = 0.02) -> int | None:
    """How many threads of other processes are running now (Linux: /proc/loadavg's runnable
    count less this one; the smallest of a few samples, so a passing blip does not count);
    None where the system does not say."""
    import time

    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        time.sleep(pause)
    return max(0, min(counts))


def _set_threads(threads: int | None) -> None:
    """``--threads N``: torch's CPU threads for this process (None: torch's default, with a
    warning when other processes leave too few cores for it)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
        if threads > 1 and not torch.cuda.is_available():  # only then can torch's threads oversubscribe
            others = running_elsewhere()
            warning = busy_machine_warning(threads, os.cpu_count(), others) if others else None
            if warning:
                logging.getLogger("erasekit").warning(warning)
        return
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _check_model_and_edits(model: str, folders: list[str]) -> None:
    """Refuse, before any weights are loaded, a model that is missing or unsupported, and edit
    folders that are missing, corrupt, newer than this erasekit, or made for another family."""
    from .edits import read_edit_meta
    from .errors import EditError
    from .models import family_of

    family = family_of(model)
    for folder in folders:
        meta = read_edit_meta(folder)
        if meta["family"] != family:
            raise EditError(
                f"the edit at {folder} was made for a {meta['family']} model ({meta['base_model']}), "
                f"and {model} is a {family} model"
            )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class _CommandFormatter(logging.Formatter):
    """Information as plain lines; warnings as ``erasekit COMMAND: warning: ...``, like the errors."""

    def __init__(self, command: str):
        super().__init__("%(message)s")
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"erasekit {self.command}: {record.levelname.lower()}: {text}"
        return text


def _show_log_messages(command: str, debug: bool) -> logging.Handler:
    """Show erasekit's log messages on stderr, one line each (INFO and up; DEBUG with --debug).

    Only the "erasekit" logger: third-party loggers keep Python's default (warnings and errors).
    Returns the handler, which :func:`main` removes when the command ends.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CommandFormatter(command))
    logger = logging.getLogger("erasekit")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    """Run the ``erasekit`` command ``argv`` (default: the process's arguments); returns the exit status.

    A user error (:class:`erasekit.errors.UserError`: a bad setting, a refused output folder) is
    one line on stderr and status 2 (``--debug``: raised, with its traceback); any other
    exception is a bug and propagates.
    """
    # transformers warns on every import that torchvision is absent (PIL is used instead): noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in results as the command that made them
    if getattr(args, "check", None) is not None:
        args.check(args)
    logger = logging.getLogger("erasekit")
    level = logger.level
    handler = _show_log_messages(args.command, args.debug)
    previous = _exit_on_sigterm()
    try:
        _set_threads(getattr(args, "threads", None))
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())  # one line
        print(f"erasekit {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:  # main may run more than once in a process (the tests): leave logging and signals as they were
        logger.removeHandler(handler)
        logger.setLevel(level)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """Make SIGTERM (``kill``, a timeout, a launcher stopping its workers) exit through the
    ``finally`` blocks, so that lock files and temporary folders are removed; returns the
    previous handler (None off the main thread, where handlers cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())
