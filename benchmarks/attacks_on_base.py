"""Do the attacks work at all? Each attack on the UNEDITED toy pipelines, where nothing was erased.

An attack that cannot bring a concept back on a model that never forgot it is broken. For
textual inversion the bar (issue acceptance): with the concept's word absent, the learned token
brings the concept back in >= 90% of images, while the token at its initial embedding (the
suite's neutral word) does in <= 35%. Prints one row per pipeline x concept x attack: success
rate, the attack's own figures, wall seconds.

    python benchmarks/attacks_on_base.py [--attacks textual-inversion] [--models sd,flux]
        [--concepts circle,triangle,heart] [--n 16] [--threads 1] [--set ATTACK.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attacks", default="textual-inversion")
    ap.add_argument("--models", default="sd,flux")
    ap.add_argument("--concepts", default="circle,triangle,heart")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="ATTACK.KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from erasekit.evaluation.attacks import attack
    from erasekit.models import load_pipeline

    attacks = args.attacks.split(",")
    configs: dict[str, dict[str, str]] = {}
    for item in args.set:
        head, _, value = item.partition("=")
        name, _, key = head.rpartition(".")
        configs.setdefault(name, {})[key] = value
    print("| model | concept | attack | no attack | success | figures | seconds |\n|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        pipe = load_pipeline(f"toy:{model}")
        pipe.set_progress_bar_config(disable=True)
        for concept in args.concepts.split(","):
            with tempfile.TemporaryDirectory() as out:
                r = attack(
                    pipe,
                    "toy-objects",
                    concept,
                    edits=[],
                    out=out,
                    attacks=attacks,
                    n=args.n,
                    configs=configs,
                    include_base=True,
                    progress=False,
                )
                for name in attacks:
                    res = r["attack_results"][name]["base"]
                    figs = {k: v for k, v in res["figures"].items() if k in ("init_asr", "pre_asr", "attack_only_asr")}
                    shown = ", ".join(f"{k} {v:.1f}" for k, v in figs.items())
                    print(
                        f"| toy:{model} | {concept} | {name} | {r['asr']['base']['no attack']:.1f} | {res['asr']:.1f} "
                        f"| {shown} | {res['seconds']:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
