"""The generation runner: PNGs + manifest, resuming after a kill, several processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erasekit.evaluation.runner import MANIFEST, RunImages, generate_run, plan_batches, read_manifest
from erasekit.evaluation.suites import Case
from erasekit.models import adapter_for

sys.path.insert(0, str(Path(__file__).parent))
import evaluation_worker as worker

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "evaluation_worker.py"


def _env():
    return os.environ | {"PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


def _png_bytes(folder) -> dict[int, bytes]:
    return {i: (Path(folder) / r["file"]).read_bytes() for i, r in read_manifest(folder).items()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The worker's run, uninterrupted, in this process."""
    folder = tmp_path_factory.mktemp("reference")
    worker.run(str(folder))
    return folder


def test_batches_group_cases_with_the_same_settings():
    cases = [
        Case("a", 0),
        Case("b", 1),
        Case("c", 2, guidance=3.0),
        Case("d", 3, guidance=3.0),
        Case("e", 4, guidance=3.0),
        Case("f", 5),
    ]
    assert plan_batches(cases, 2) == [[0, 1], [2, 3], [4], [5]]
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(cases, 0)


def test_run_writes_one_png_and_manifest_line_per_case(reference_run):
    lines = (reference_run / MANIFEST).read_text().splitlines()
    assert len(lines) == worker.N_CASES
    records = [json.loads(line) for line in lines]
    assert sorted(r["index"] for r in records) == list(range(worker.N_CASES))
    cases = worker.cases()
    for r in records:
        assert (r["prompt"], r["seed"]) == (cases[r["index"]].prompt, cases[r["index"]].seed)
        assert r["steps"] == 4 and (r["height"], r["width"]) == (32, 32)
    images = RunImages(reference_run, records)
    assert (
        len(images) == worker.N_CASES
        and images[0].shape == (3, 32, 32)
        and 0 <= images[0].min() <= images[0].max() <= 1
    )
    run = json.loads((reference_run / "run.json").read_text())
    assert run["n"] == worker.N_CASES and run["batch_size"] == worker.BATCH_SIZE


def test_a_finished_run_is_not_redone_and_another_run_is_refused(reference_run, sd_pipe):
    before = {p: p.stat().st_mtime_ns for p in (reference_run / "images").iterdir()}
    records = worker.run(str(reference_run))  # everything done: nothing generated
    assert len(records) == worker.N_CASES
    assert {p: p.stat().st_mtime_ns for p in (reference_run / "images").iterdir()} == before
    with pytest.raises(ValueError, match="holds another run"):
        generate_run(
            adapter_for(sd_pipe), worker.cases()[:3], reference_run, identity={"model": "tiny-sd"}, progress=False
        )


def test_killed_run_resumes_without_regenerating_finished_images(tmp_path, reference_run):
    folder = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(folder), "1.0"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 240
    try:
        while len(read_manifest(folder)) < 4:  # two batches recorded, the third one under way
            assert proc.poll() is None, f"the worker ended early: {proc.stdout.read().decode()[-2000:]}"
            assert time.time() < deadline, "the worker made no progress"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = read_manifest(folder)
    assert 4 <= len(finished) < worker.N_CASES, "the kill came too late to test resuming"
    stamps = {i: (folder / r["file"]).stat().st_mtime_ns for i, r in finished.items()}

    worker.run(str(folder))

    lines = [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == list(range(worker.N_CASES)), (
        "an image was generated twice or not at all"
    )
    assert {i: (folder / finished[i]["file"]).stat().st_mtime_ns for i in finished} == stamps
    assert _png_bytes(folder) == _png_bytes(reference_run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_the_same_images_as_one(tmp_path, reference_run):
    folder = tmp_path / "two"
    # --multi_gpu is accelerate's torchrun launcher; without a GPU the runner's processes use
    # the CPU and gloo (accelerate's --cpu launcher would need MPI for two processes).
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(WORKER),
        str(folder),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_manifest(folder)
    assert {r["process"] for r in records.values()} == {0, 1}, "the work was not spread over both processes"
    assert _png_bytes(folder) == _png_bytes(reference_run)
