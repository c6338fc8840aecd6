"""A generation run in its own process, for the runner's interruption and multi-process tests.

python tests/evaluation_worker.py FOLDER [SLEEP_SECONDS_AFTER_EACH_BATCH]
accelerate launch --multi_gpu --num_processes 2 tests/evaluation_worker.py FOLDER   (CPU-only: gloo)
"""

import os
import sys
import time

import torch

torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny_pipelines import tiny_sd_pipeline  # noqa: E402

from erasekit.evaluation.runner import generate_run  # noqa: E402
from erasekit.evaluation.suites import Case  # noqa: E402
from erasekit.models import adapter_for  # noqa: E402

N_CASES = 10
BATCH_SIZE = 2


def cases() -> list[Case]:
    prompts = ["a red car", "a blue circle", "a green tree", "a dog in a park", "a cat on a house"]
    return [Case(prompts[i % len(prompts)], seed=100 + i, set="default") for i in range(N_CASES)]


def run(folder: str, sleep: float = 0.0) -> list[dict]:
    adapter = adapter_for(tiny_sd_pipeline(seed=0))
    pause = (lambda _batch: time.sleep(sleep)) if sleep else None
    return generate_run(
        adapter,
        cases(),
        folder,
        batch_size=BATCH_SIZE,
        identity={"model": "tiny-sd"},
        progress=False,
        after_batch=pause,
    )


if __name__ == "__main__":
    run(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
