"""``erasekit bench toy`` on the tiny pipelines: the table's structure, resuming, the restore
check, failures, and the command line."""

import json

import pytest
import torch
from tiny_pipelines import TINY_DEFAULTS, tiny_flux_pipeline, tiny_sd_pipeline

import erasekit.bench as bench
from erasekit.cli import main
from erasekit.models.loading import write_defaults
from erasekit.toyworld.detector import HEADS

FAST = {"esd": {"iterations": "1", "rollout_steps": "2"}, "uce": {"samples": "1"}}


class StubDetector:
    """A fixed random linear read-out of the images' mean colour per quadrant: deterministic,
    and it changes its mind when the images change."""

    name = "stub"
    threshold = "argmax"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = {h: torch.randn(12, len(c), generator=g) for h, c in HEADS.items()}

    def classify(self, images):
        feats = torch.nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1)  # (B, 12)
        return {h: (feats @ w * 50).softmax(-1) for h, w in self.w.items()}

    def detect(self, images, concept):  # the Detector protocol (the attacks use it)
        from erasekit.evaluation.detectors import Detection

        head = next(h for h, classes in HEADS.items() if concept in classes)
        probs = self.classify(images)[head]
        k = HEADS[head].index(concept)
        return Detection(probs[:, k], probs.argmax(1) == k, concept, self.name, self.threshold)


def _bench(tmp_path, models, methods=("esd-x", "uce"), **kw):
    used = {bench.variant_method(m)[0] for m in methods}
    args = dict(
        concepts=["circle"],
        overrides={k: v for k, v in FAST.items() if k in used},
        n=1,
        n_locality=1,
        out=tmp_path / "bench",
        detector=StubDetector(),
        progress=False,
    )
    return bench.run_bench(models, methods, **(args | kw))


def _counting(monkeypatch):
    calls = {"erase": 0, "suite": 0}
    real_erase, real_suite = bench.erase, bench.evaluate_run

    def erase(*a, **k):
        calls["erase"] += 1
        return real_erase(*a, **k)

    def suite(*a, **k):
        calls["suite"] += 1
        return real_suite(*a, **k)

    monkeypatch.setattr(bench, "erase", erase)
    monkeypatch.setattr(bench, "evaluate_run", suite)
    return calls


def test_table_and_a_resumed_run_skips_finished_rows(tmp_path, monkeypatch):
    models = {"sd": tiny_sd_pipeline(), "flux": tiny_flux_pipeline()}
    real_suite = bench.evaluate_run
    count = {"n": 0}

    def dies_third(*a, **k):  # the run is killed during the third row (sd / circle / uce)
        count["n"] += 1
        if count["n"] == 3:
            raise KeyboardInterrupt
        return real_suite(*a, **k)

    monkeypatch.setattr(bench, "evaluate_run", dies_third)
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, models)
    lines = (tmp_path / "bench" / "rows.jsonl").read_text().splitlines()
    assert [json.loads(x)["method"] for x in lines] == ["base", "esd-x"]
    with open(tmp_path / "bench" / "rows.jsonl", "a") as f:
        f.write('{"key": "torn li')  # a write cut short by the kill

    monkeypatch.setattr(bench, "evaluate_run", real_suite)
    calls = _counting(monkeypatch)
    result = _bench(tmp_path, models, command="erasekit bench toy ...")
    assert calls == {"erase": 3, "suite": 4}  # sd: uce; flux: base, esd-x, uce
    assert result["skipped"] == 2 and not result["errors"]

    rows = result["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        (m, k) for m in ("sd", "flux") for k in ("base", "esd-x", "uce")
    ]
    for r in rows:
        assert r["concept"] == "circle" and r["n_images"] == 4 + 5  # 1 per set, 1 per other object
        assert all(0 <= r[k] <= 100 for k in ("acc_e", "acc_r", "acc_l", "h"))
        assert set(r["per_set"]) == {"simple", "paraphrase", "synonym", "indirect", "locality"}
        if r["method"] == "base":
            assert "fit_seconds" not in r
        else:
            assert r["fit_seconds"] > 0 and r["fit_peak_mb"] >= 0 and r["memory_kind"] == "cpu-rss"
            assert r["hyperparameters"]["iterations" if r["method"] == "esd-x" else "samples"] == 1
    assert rows[1]["hyperparameters"]["group"] == "esd-x"
    means = result["means"]
    assert sorted((m["model"], m["method"]) for m in means) == sorted((r["model"], r["method"]) for r in rows)
    by_name = {(m["model"], m["method"]): m for m in means}
    assert by_name["sd", "esd-x"]["acc_e"] == rows[1]["acc_e"] and by_name["sd", "esd-x"]["concepts"] == ["circle"]

    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved["rows"] == rows and saved["command"] == "erasekit bench toy ..."
    assert {"torch", "diffusers", "transformers", "peft"} <= set(saved["versions"])
    assert saved["machine"]["cpu_count"] >= 1 and saved["settings"]["n"] == 1
    md = (tmp_path / "bench" / "bench.md").read_text()
    table = [line for line in md.split("Per concept")[0].splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | method | eta | Acc_E | Acc_R | Acc_L | H | worst H | fit s | fit peak MiB |")
    assert [line.split(" | ")[:2] for line in table[1:]] == [["| " + m["model"], m["method"]] for m in means]
    assert [m["method"] for m in means][::3] == ["base", "base"]  # base first within each model

    again = _bench(tmp_path, models)  # everything is there: nothing runs
    assert calls == {"erase": 3, "suite": 4} and again["skipped"] == 6 and again["rows"] == rows
    other_n = _bench(tmp_path, {"flux": models["flux"]}, methods=["uce"], n=2)  # other settings: run anew
    assert calls == {"erase": 4, "suite": 6} and other_n["skipped"] == 0 and other_n["rows"][0]["n_images"] == 8 + 5


def test_a_row_another_process_finished_meanwhile_is_skipped(tmp_path, monkeypatch):
    models = {"sd": tiny_sd_pipeline()}
    _bench(tmp_path, models, methods=["uce"], out=tmp_path / "other")
    finished = (tmp_path / "other" / "rows.jsonl").read_text().splitlines()
    uce_line = next(line for line in finished if json.loads(line)["method"] == "uce")
    real_suite = bench.evaluate_run

    def other_process_finishes_uce(*a, **k):  # while this process scores its base row
        with open(tmp_path / "bench" / "rows.jsonl", "a") as f:
            f.write(uce_line + "\n")
        return real_suite(*a, **k)

    calls = _counting(monkeypatch)
    monkeypatch.setattr(bench, "evaluate_run", other_process_finishes_uce)
    result = _bench(tmp_path, models, methods=["uce"])
    assert calls["erase"] == 0 and result["skipped"] == 1
    assert [r["method"] for r in result["rows"]] == ["base", "uce"]
    assert result["rows"][1] == json.loads(uce_line)


def _hold_row_lock(folder, key, seconds):
    """Another process holding row ``key``'s lock in bench folder ``folder`` for ``seconds``."""
    import subprocess
    import sys

    lock = folder / bench.RUNNING / key / ".erasekit.lock"
    lock.parent.mkdir(parents=True)
    code = (
        f"import fcntl, time; f = open({str(lock)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        f"print('held', flush=True); time.sleep({seconds})"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_row_another_process_is_running_is_left_to_it(tmp_path, monkeypatch):
    models = {"sd": tiny_sd_pipeline()}
    _bench(tmp_path, models, methods=["uce"], out=tmp_path / "other")
    rows = [json.loads(line) for line in (tmp_path / "other" / "rows.jsonl").read_text().splitlines()]
    holder = _hold_row_lock(tmp_path / "bench", next(r["key"] for r in rows if r["method"] == "uce"), 60)
    try:
        calls = _counting(monkeypatch)
        result = _bench(tmp_path, models, methods=["uce"])
    finally:
        holder.kill()
        holder.wait()
    assert calls["erase"] == 0 and [r["method"] for r in result["rows"]] == ["base"]
    assert result["missing"] == ["sd / circle / uce / seed 0 (running in another process)"]
    again = _bench(tmp_path, models, methods=["uce"])  # the lock is free: the row runs
    assert calls["erase"] == 1 and [r["method"] for r in again["rows"]] == ["base", "uce"]


def test_a_tuning_row_another_process_is_running_is_waited_for(tmp_path, monkeypatch):
    import time

    models = {"sd": tiny_sd_pipeline()}
    monkeypatch.setattr(bench, "TUNE_GRIDS", {"uce": [{"lamb": "0.5"}, {"lamb": "1"}]})
    _bench(tmp_path, models, methods=["uce"], tune=True, out=tmp_path / "other")
    tuned = [json.loads(line) for line in (tmp_path / "other" / "rows.jsonl").read_text().splitlines()]
    first = next(r["key"] for r in tuned if r.get("phase") == "tune")
    monkeypatch.setattr(bench, "ROW_WAIT_SECONDS", 0.2)
    holder = _hold_row_lock(tmp_path / "bench", first, 3)  # it ends without writing the row
    start = time.monotonic()
    try:
        calls = _counting(monkeypatch)
        result = _bench(tmp_path, models, methods=["uce"], tune=True)
    finally:
        holder.kill()
        holder.wait()
    assert time.monotonic() - start >= 2.5  # waited for the lock, then ran the row itself
    assert calls["erase"] == 3 and not result["missing"] and len(result["tune"]["rows"]) == 2


def test_report_only_writes_the_tables_from_finished_rows_and_runs_nothing(tmp_path, monkeypatch):
    models = {"sd": tiny_sd_pipeline()}
    first = _bench(tmp_path, models, methods=["uce"])
    calls = _counting(monkeypatch)
    result = _bench(tmp_path, models, methods=["esd-x", "uce"], report_only=True)
    assert calls == {"erase": 0, "suite": 0}
    assert [r["method"] for r in result["rows"]] == ["base", "uce"] and result["rows"] == first["rows"]
    assert result["missing"] == ["sd / circle / esd-x / seed 0"]
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved["missing"] == result["missing"] and [m["method"] for m in saved["means"]] == ["base", "uce"]
    assert "**not yet run** (1 rows" in (tmp_path / "bench" / "bench.md").read_text()


def test_a_remove_that_does_not_restore_stops_the_bench(tmp_path, monkeypatch):
    import erasekit.edits

    monkeypatch.setattr(erasekit.edits, "remove", lambda pipe, edit: None)
    with pytest.raises(bench.RestoreError, match="after uce on sd"):
        _bench(tmp_path, {"sd": tiny_sd_pipeline()}, methods=["uce"])


def test_a_failing_method_is_recorded_and_retried(tmp_path, monkeypatch):
    real = bench.erase

    def broken(pipe, concept, method, config, progress=True):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench, "erase", broken)
    result = _bench(tmp_path, {"sd": tiny_sd_pipeline()}, methods=["uce"])
    assert result["errors"] == [
        {"model": "sd", "concept": "circle", "method": "uce", "error": "RuntimeError: out of memory"}
    ]
    assert [r["method"] for r in result["rows"]] == ["base"]
    assert "**failed**: sd / uce / circle" in (tmp_path / "bench" / "bench.md").read_text()
    monkeypatch.setattr(bench, "erase", real)
    result = _bench(tmp_path, {"sd": tiny_sd_pipeline()}, methods=["uce"])
    assert result["skipped"] == 1 and [r["method"] for r in result["rows"]] == ["base", "uce"] and not result["errors"]


def test_method_configs_layer_preset_quick_and_overrides():
    cfg = bench.method_configs(
        ["esd-x", "esd-u", "receler"], "fast", {"esd": {"lr": "0.5"}, "esd-u": {"iterations": "7"}}, quick=True
    )
    assert (cfg["esd-x"].group, cfg["esd-u"].group) == ("esd-x", "esd-u")
    assert (cfg["esd-x"].lr, cfg["esd-u"].lr) == (0.5, 0.5)
    assert (cfg["esd-x"].iterations, cfg["esd-u"].iterations) == (3, 7)  # quick, then the row's own
    assert cfg["receler"].iterations == 3 and cfg["receler"].rank == 32  # quick over the fast preset
    assert bench.method_configs(["receler"], "fast", None, quick=False)["receler"].iterations == 100
    with pytest.raises(ValueError, match="does not run"):
        bench.method_configs(["uce"], "fast", {"esd": {"lr": "1"}}, quick=False)
    with pytest.raises(ValueError, match="no setting 'depth'"):
        bench.method_configs(["uce"], "fast", {"uce": {"depth": "1"}}, quick=False)
    with pytest.raises(ValueError, match="unknown erasure method 'nope'"):
        bench.variant_method("nope")
    assert set(bench.DEFAULT_METHODS) >= {
        "receler",
        "eraseanything",
        "esd-x",
        "esd-u",
        "uce",
        "keyword_zeroing",
        "sld",
    }


def test_bench_command_on_a_pipeline_folder(tmp_path, capsys):
    tiny_sd_pipeline().save_pretrained(tmp_path / "model")
    write_defaults(tmp_path / "model", TINY_DEFAULTS)
    out = tmp_path / "out"
    args = [
        "bench",
        "toy",
        "--models",
        str(tmp_path / "model"),
        "--methods",
        "keyword_zeroing",
        "--concepts",
        "circle",
        "--n",
        "1",
        "--n-locality",
        "1",
        "--out",
        str(out),
        "--set",
        "keyword_zeroing.keywords=disc",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| model | method | eta | Acc_E" in printed and "| model | keyword_zeroing |" in printed
    saved = json.loads((out / "bench.json").read_text())
    assert saved["command"].startswith("erasekit ") and saved["detector"]["name"] == "toyworld-classifier"
    assert saved["rows"][1]["hyperparameters"]["keyword_list"] == ["circle", "disc"]
    assert main(args[:-1] + ["keywords=disc"]) == 2  # a user error: one line, exit 2
    assert "method.key=value" in capsys.readouterr().err


def test_bench_figures_equal_evaluate_for_the_same_edit_seeds_and_suite(tmp_path, monkeypatch):
    """A bench row is one in-memory run of evaluate's own run function: `erasekit evaluate` on
    the same edit (its PNG run folders, its batch size) gives the same figures."""
    from erasekit.evaluation.evaluate import evaluate

    edits = []
    real_erase = bench.erase

    def keep(*a, **k):
        edits.append(real_erase(*a, **k))
        return edits[-1]

    monkeypatch.setattr(bench, "erase", keep)
    pipe = tiny_sd_pipeline()
    sizes = {"n": 2, "n_locality": 2}  # 8 + 10 images: two of evaluate's batches of 16, one of the bench's
    result = _bench(tmp_path, {"sd": pipe}, methods=["uce"], **sizes)
    assert [r["method"] for r in result["rows"]] == ["base", "uce"]
    results = evaluate(
        pipe,
        "toy-objects",
        "circle",
        edits=edits,
        out=tmp_path / "eval",
        detector=StubDetector(),
        suite_options=sizes,
        progress=False,
    )
    assert results["generation"]["batch_size"] == 16 and (tmp_path / "eval" / "runs" / "uce@1").is_dir()
    for row, run in zip(result["rows"], results["runs"]):
        assert run["label"] == row["method"]
        for key in ("acc_e", "acc_r", "acc_l", "h", "per_set", "color_accuracy", "n_images"):
            assert run["metrics"][key] == row[key], (row["method"], key)
    in_memory = evaluate(
        pipe, "toy-objects", "circle", edits=edits, detector=StubDetector(), suite_options=sizes, in_memory=True
    )
    assert [r["metrics"] for r in in_memory["runs"]] == [r["metrics"] for r in results["runs"]]


# ---- a fair bench: eta in ALGORITHMS' form, seeds, attacks and worst-case H, tuning -----------


def test_every_esd_family_config_states_its_eta_in_algorithms_form():
    from erasekit.methods import make_config

    assert make_config("esd", "paper").guidance_eta() == 1.0  # the release's eta 2 in its own form
    assert make_config("esd", "fast", {"target_base": "uncond", "eta": "3"}).guidance_eta() == 3.0
    assert make_config("receler", "fast").guidance_eta() == make_config("eraseanything", "fast").guidance_eta() == 3.0
    assert make_config("uce", "fast").guidance_eta() is None
    cfg = bench.method_configs(["esd-u", "receler", "eraseanything"], "fast", None, quick=True)
    assert {m: c.guidance_eta() for m, c in cfg.items()} == {"esd-u": 3.0, "receler": 3.0, "eraseanything": 3.0}
    assert bench.method_configs(["esd-u"], "paper", None, quick=True)["esd-u"].guidance_eta() == 1.0


def test_worst_case_h_and_the_order_of_the_table():
    from erasekit.evaluation.metrics import harmonic_h

    assert bench.worst_case_h(10, 20, 90) == harmonic_h(10, 20, 90)
    assert bench.worst_case_h(10, 20, 90, {"a": 50.0, "b": 5.0, "c": float("nan")}) == harmonic_h(10, 50, 90)
    assert bench.worst_case_h(10, 20, 90, {"a": 100.0}) == 0.0
    rows = [
        {"method": "x", "worst_h": 50.0},
        {"method": "y", "worst_h": float("nan")},
        {"method": "base", "worst_h": 0.0},
        {"method": "z", "worst_h": 80.0},
    ]
    assert [r["method"] for r in bench.sort_rows(rows)] == ["base", "z", "x", "y"]
    assert bench.pick_best([{"worst_h": 1.0}, {"worst_h": float("nan")}, {"worst_h": 3.0}, {"worst_h": 3.0}]) == 2


def test_seeds_give_per_seed_rows_and_mean_and_spread(tmp_path, monkeypatch):
    models = {"sd": tiny_sd_pipeline()}
    result = _bench(tmp_path, models, methods=["esd-x", "keyword_zeroing"], seeds=[0, 1])
    rows = result["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("base", None),
        ("esd-x", 0),
        ("esd-x", 1),
        ("keyword_zeroing", None),
    ]
    assert [r["hyperparameters"]["seed"] for r in rows[1:3]] == [0, 1]
    assert rows[1]["eta"] == 3.0 and rows[0]["eta"] is None and rows[3]["eta"] is None  # ALGORITHMS' form
    lines = [json.loads(x) for x in (tmp_path / "bench" / "rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in lines] == [(r["method"], r["seed"]) for r in rows]
    esd = next(m for m in result["means"] if m["method"] == "esd-x")
    assert esd["seeds"] == [0, 1] and [p["seed"] for p in esd["per_seed"]] == [0, 1]
    values = [rows[1]["acc_e"], rows[2]["acc_e"]]
    assert esd["acc_e"] == pytest.approx(sum(values) / 2)
    assert esd["acc_e_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert (esd["acc_e_min"], esd["acc_e_max"]) == (min(values), max(values))
    assert esd["eta"] == 3.0
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "training seeds 0, 1" in md and "| sd | esd-x | 3 | " in md and " ± " in md

    calls = _counting(monkeypatch)  # a rerun with the same seeds runs nothing; one more seed runs one row
    again = _bench(tmp_path, models, methods=["esd-x", "keyword_zeroing"], seeds=[0, 1, 2])
    assert calls == {"erase": 1, "suite": 1} and again["skipped"] == 4
    assert [r["seed"] for r in again["rows"] if r["method"] == "esd-x"] == [0, 1, 2]


def test_a_row_stopped_during_its_attacks_resumes_after_a_restart(tmp_path):
    pipe = tiny_sd_pipeline()
    first = _bench(tmp_path, {"sd": pipe}, methods=["uce"], attacks=["paraphrase"], attack_n=1)
    rows_file = tmp_path / "bench" / "rows.jsonl"
    lines = rows_file.read_text().splitlines()
    rows_file.write_text(lines[0] + "\n")  # the uce row never finished; its attack folder is there
    again = _bench(tmp_path, {"sd": pipe}, methods=["uce"], attacks=["paraphrase"], attack_n=1)
    assert not again["errors"], again["errors"]  # the refitted edit is the same edit: its folder resumes
    assert again["rows"][1]["attacks"] == first["rows"][1]["attacks"]


def test_attacks_add_columns_and_order_the_table_by_worst_case_h(tmp_path, monkeypatch):
    """A real prompt attack through erasekit.evaluation.attacks.attack, then a stubbed one whose
    success decides the order."""
    pipe = tiny_sd_pipeline()
    result = _bench(tmp_path / "real", {"sd": pipe}, methods=["uce"], attacks=["paraphrase"], attack_n=1)
    base, row = result["rows"]
    assert 0 <= base["attacks"]["paraphrase"] <= 100 and 0 <= row["attacks"]["paraphrase"] <= 100  # base: unedited
    assert row["worst_h"] == bench.worst_case_h(row["acc_e"], row["acc_r"], row["acc_l"], row["attacks"])
    assert (tmp_path / "real" / "bench" / "attacks" / row["key"] / "results.json").is_file()

    success = {"uce": 100.0, "keyword_zeroing": 0.0}

    def fake_attack(pipe, suite, concept, edits, out, attacks, **kw):
        assert kw["n"] == 1 and suite == "toy-objects"
        label = edits[0].method if edits else "base"
        return {"asr": {label: {"no attack": 0.0} | {a: success.get(label, 100.0) for a in attacks}}}

    monkeypatch.setattr(bench, "attack", fake_attack)
    result = _bench(
        tmp_path / "fake", {"sd": pipe}, methods=["uce", "keyword_zeroing"], attacks=["soft-prompt"], attack_n=1
    )
    means = {m["method"]: m for m in result["means"]}
    assert means["uce"]["attacks"] == {"soft-prompt": 100.0} and means["uce"]["worst_h"] == 0.0
    assert [m["method"] for m in result["means"]] == ["base", "keyword_zeroing", "uce"]
    md = (tmp_path / "fake" / "bench" / "bench.md").read_text()
    assert "| model | method | eta | Acc_E | Acc_R | Acc_L | H | soft-prompt | worst H |" in md
    assert "| sd | base | - |" in md  # no eta
    with pytest.raises(ValueError, match="nope"):
        _bench(tmp_path / "bad", {"sd": pipe}, methods=["uce"], attacks=["nope"])


def test_tune_picks_the_best_worst_case_h_on_the_dev_concept_and_runs_the_concepts_with_it(tmp_path, monkeypatch):
    seen = []

    def fake_row(pipe, concept, method, config, *a, **k):  # figures that depend on the grid setting
        seen.append((concept, method, config))
        quality = {"none": 10.0, "objects": 60.0}[config.template_set] + (5.0 if config.token_span == "to-end" else 0)
        if method == "base":
            quality = 0.0
        figures = {"acc_e": 100 - quality, "acc_r": 100 - quality, "acc_l": 90.0}
        h = bench.harmonic_h(*figures.values())
        extra = {"per_set": {}, "color_accuracy": 0.0, "n_images": 1, "suite_seconds": 0.0}
        return figures | extra | {"h": h, "worst_h": h}

    monkeypatch.setattr(bench, "_run_row", fake_row)
    with pytest.raises(ValueError, match="development concept 'circle' is one of the reported"):
        _bench(tmp_path, {"sd": tiny_sd_pipeline()}, methods=["uce"], tune=True, dev_concept="circle")
    assert not seen
    result = _bench(tmp_path, {"sd": tiny_sd_pipeline()}, methods=["uce", "keyword_zeroing"], tune=True)
    grid = bench.TUNE_GRIDS["uce"]
    assert [c for c, m, _ in seen[: len(grid)]] == ["square"] * len(grid)
    assert {(cfg.template_set, cfg.token_span) for _, _, cfg in seen[: len(grid)]} == {
        (g["template_set"], g["token_span"]) for g in grid
    }
    choice, single = result["tune"]["choices"]
    assert single["method"] == "keyword_zeroing" and single["tried"] == []  # one setting: no tuning rows
    assert choice["model"] == "sd" and choice["settings"] == {"template_set": "objects", "token_span": "to-end"}
    assert choice["worst_h"] == max(r["worst_h"] for r in result["tune"]["rows"])
    reported = [(c, m, cfg) for c, m, cfg in seen[len(grid) :]]
    assert [(c, m) for c, m, _ in reported] == [("circle", "base"), ("circle", "uce"), ("circle", "keyword_zeroing")]
    assert (reported[1][2].template_set, reported[1][2].token_span) == ("objects", "to-end")
    assert all(r["concept"] == "circle" for r in result["rows"])  # tuning rows are not reported
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "development concept 'square'" in md and "| sd | uce | template_set=objects, token_span=to-end |" in md


def test_every_tune_grid_is_small_and_uce_tries_templates_and_the_last_token_option():
    for method in bench.DEFAULT_METHODS:
        assert 1 <= len(bench.tune_grid(method)) <= bench.MAX_GRID
        bench.method_configs([method], "fast", None, quick=True, tuned={method: bench.tune_grid(method)[0]})
    uce = bench.TUNE_GRIDS["uce"]
    assert {g["template_set"] for g in uce} == {"none", "objects"} and {g["token_span"] for g in uce} == {
        "last",
        "to-end",
    }
    rece = bench.TUNE_GRIDS["rece"]  # the release's regulariser strengths for objects x rounds
    assert {g["regular_scale"] for g in rece} == {"1e-3", "1e-1"} and {g["rounds"] for g in rece} == {"1", "2", "3"}
    tuned = bench.method_configs(["rece"], "fast", None, quick=False, tuned={"rece": rece[-1]})["rece"]
    assert (tuned.regular_scale, tuned.rounds, tuned.template_set) == (0.1, 3, "objects")


def test_oracle_row_and_gaps(tmp_path):
    """A pipeline retrained without the concept (here another tiny pipeline) in oracles/sd-no-circle
    gets its own row after the base row, attacked with the shipped model's images as targets, and
    every method its gaps to it; a missing oracle is named."""
    oracles = tmp_path / "oracles"
    tiny_sd_pipeline(seed=3).save_pretrained(oracles / "sd-no-circle")
    pipe = tiny_sd_pipeline()
    result = _bench(
        tmp_path,
        {"sd": pipe},
        methods=["uce"],
        concepts=["circle", "square"],
        oracles=oracles,
        attacks=["paraphrase"],
        attack_n=1,
    )
    methods = [(r["concept"], r["method"]) for r in result["rows"]]
    assert methods == [
        ("circle", "base"),
        ("circle", "oracle"),
        ("circle", "uce"),
        ("square", "base"),
        ("square", "uce"),
    ]
    oracle = result["rows"][1]
    assert oracle["settings"]["source"] == str((oracles / "sd-no-circle").resolve()) and "attacks" in oracle
    assert (tmp_path / "bench" / "attacks" / oracle["key"] / "reference").is_dir()  # targets from the shipped model
    uce_row = result["rows"][2]
    (gap,) = result["oracle_gaps"]
    assert gap["method"] == "uce" and gap["concept"] == "circle"
    assert gap["acc_e"] == pytest.approx(uce_row["acc_e"] - oracle["acc_e"])
    assert gap["worst_h"] == pytest.approx(uce_row["worst_h"] - oracle["worst_h"])
    assert [m["method"] for m in result["means"]][:2] == ["base", "oracle"]
    assert result["oracles_missing"] == ["sd-no-square"]
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "Gap to oracle" in md and "No oracle sd-no-square" in md
    # the report shows base / oracle / edited images of the same seeds
    assert all((tmp_path / "bench" / "grids" / r["grid"]["file"]).is_file() for r in result["rows"])
    assert oracle["grid"]["seeds"] == uce_row["grid"]["seeds"] == result["rows"][0]["grid"]["seeds"]
    report = (tmp_path / "bench" / "report.html").read_text()
    assert [report.count(f"<figcaption>{m}") for m in ("base", "oracle", "uce")] == [2, 1, 2]


def test_rows_are_keyed_by_location_independent_source_names(tmp_path):
    from erasekit.bench import source_name
    from erasekit.models.loading import resolve_pipeline_name

    assert source_name(str(resolve_pipeline_name("toy:sd"))) == "toy:sd"
    oracle = tmp_path / "sd-no-circle"
    oracle.mkdir()
    (oracle / "training.json").write_text(json.dumps({"config": {"exclude": ["circle"]}}))
    assert source_name(str(oracle)) == "oracle:sd-no-circle"
    (oracle / "training.json").write_text(json.dumps({"config": {"exclude": ["circle"], "seed": 1}}))
    assert source_name(str(oracle)) == "oracle:sd-no-circle/seed 1"
    other = tmp_path / "mine"
    other.mkdir()
    assert source_name(str(other)) == str(other.resolve())


def test_a_seed_that_gives_the_same_edit_shares_the_figures_of_the_first(tmp_path, monkeypatch):
    """UCE's seed draws only Flux's noise: on SD its seeds give one edit, run once; ESD's differ."""
    models = {"sd": tiny_sd_pipeline()}
    calls = _counting(monkeypatch)
    result = _bench(tmp_path, models, methods=["uce", "esd-x"], seeds=[0, 1])
    rows = {(r["method"], r["seed"]): r for r in result["rows"]}
    first, second = rows[("uce", 0)], rows[("uce", 1)]
    assert second["same_edit_as"] == first["key"] and second["edit_fingerprint"] == first["edit_fingerprint"]
    assert all(second[k] == first[k] for k in ("acc_e", "acc_r", "acc_l", "h", "per_set", "worst_h"))
    assert "same_edit_as" not in first and "same_edit_as" not in rows[("esd-x", 1)]
    assert rows[("esd-x", 0)]["edit_fingerprint"] != rows[("esd-x", 1)]["edit_fingerprint"]
    assert calls == {"erase": 4, "suite": 4}  # base, uce seed 0, esd-x seeds 0 and 1: one suite each


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_the_committed_fair_bench_rows_keep_their_keys(family, tmp_path, capsys):
    """A setting added to a method (at its default) must not re-key rows already recorded
    (``bench.LATE_SETTINGS``): every row of the committed fair bench is found again by the command
    that recorded it (its bench.md header)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "fair-bench" / family
    if not (folder / "rows.jsonl").exists():
        pytest.skip("no committed fair bench")
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]
    command = (folder / "bench.md").read_text().split("`erasekit ", 1)[1].split("`", 1)[0].split()
    (tmp_path / "rows.jsonl").write_text((folder / "rows.jsonl").read_text())
    out = command.index("--out")
    command[out + 1] = str(tmp_path)
    assert main([*command, "--report-only"]) == 0
    found = int(capsys.readouterr().out.split(" rows were already in")[0].split()[-1])
    assert found == len({r["key"] for r in rows if "error" not in r})
