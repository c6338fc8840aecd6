"""The training-run helper (erasekit.methods.training): checkpoint identity (concept, model,
method), divergence checks, trainable parameter counts, hooks, and the model-folder hash."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.errors import UserError
from erasekit.methods import esd, get_method, receler
from erasekit.methods.checkpoints import CheckpointMismatch, folder_sha256, model_identity
from erasekit.methods.eraseanything import EraseAnythingConfig
from erasekit.methods.esd import ESDConfig
from erasekit.methods.hooks import TrainingHooks, training_hooks
from erasekit.methods.receler import RecelerConfig
from erasekit.methods.training import TrainingDiverged

RECELER = dict(iterations=2, rank=4, adv_tokens=2, adv_steps=1, rollout_steps=2, checkpoint_every=1, lr=1e-2)
ESD = dict(iterations=2, rollout_steps=2, lr=1e-2, checkpoint_every=1)
EA = dict(iterations=2, preserve_images=1, preserve_steps=1, rollout_steps=2, rsc_steps=1, checkpoint_every=1, rank=2)
EA_WORDS = dict(synonyms="automobile", irrelevant="dog,cat,tree", lexicon="none")
BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
CONFIGS = {
    "receler": lambda **kw: RecelerConfig(**(RECELER | kw)),
    "esd": lambda **kw: ESDConfig(**(ESD | kw)),
    "eraseanything": lambda **kw: EraseAnythingConfig(**(EA | EA_WORDS | kw)),
}


def _fit(method, pipe, concept="car", checkpoint_dir=None, **kw):
    return get_method(method).fit(pipe, concept, CONFIGS[method](**kw), checkpoint_dir=checkpoint_dir, progress=False)


# ---- checkpoint identity ---------------------------------------------------------------------


def test_a_checkpoint_of_another_concept_is_refused(tmp_path):
    pipe = tiny_sd_pipeline()
    _fit("receler", pipe, "car", tmp_path)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["concepts"] == ["car"] and meta["method"] == "receler" and meta["edit_kind"] == "output_adapter"
    assert meta["model"]["in_memory"] == "StableDiffusionPipeline"
    with pytest.raises(CheckpointMismatch, match=r"made for concept 'car', not 'dog'; use another --checkpoint-dir"):
        _fit("receler", pipe, "dog", tmp_path)
    assert json.loads((tmp_path / "checkpoint.json").read_text()) == meta  # untouched


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    _fit("esd", tiny_sd_pipeline(seed=0), "car", tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"made for model an in-memory StableDiffusionPipeline"):
        _fit("esd", tiny_sd_pipeline(seed=1), "car", tmp_path)
    # The same weights built again resume (here: the finished run, nothing more to train).
    again = _fit("esd", tiny_sd_pipeline(seed=0), "car", tmp_path)
    assert again.metrics["resumed_from"] == again.metrics["iterations"] == ESD["iterations"]


def test_a_checkpoint_of_another_method_or_setting_is_refused(tmp_path):
    pipe = tiny_sd_pipeline()
    _fit("receler", pipe, "car", tmp_path)
    with pytest.raises(CheckpointMismatch, match="made for method 'receler', not 'esd'"):
        _fit("esd", pipe, "car", tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"other settings \(config.lr\)") as err:
        _fit("receler", pipe, "car", tmp_path, lr=5e-3)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_eraseanything_records_its_words_and_concept_once(tmp_path):
    pipe = tiny_sd_pipeline()
    _fit("eraseanything", pipe, "car", tmp_path)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["concepts"] == ["car"] and "concept" not in meta
    assert meta["synonyms"] == ["automobile"] and meta["irrelevant"] == ["dog", "cat", "tree"]
    with pytest.raises(CheckpointMismatch, match="concept 'car', not 'dog'"):
        _fit("eraseanything", pipe, "dog", tmp_path, synonyms="cat")


def test_model_identity_of_a_folder_hashes_its_files_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.bin").write_bytes(b"abc")
    (model / "model_index.json").write_text("{}")
    (model / ".cache").mkdir()
    (model / ".cache" / "ignored").write_text("x")
    first = folder_sha256(model)
    cache = json.loads((tmp_path / "cache" / "file_hashes.json").read_text())
    assert len(cache) == 2  # hidden files are not part of the model
    moved = tmp_path / "moved"
    model.rename(moved)
    assert folder_sha256(moved) == first
    (moved / "unet" / "weights.bin").write_bytes(b"abd")
    assert folder_sha256(moved) != first

    class Pipe:
        name_or_path = str(moved)

    identity = model_identity(Pipe())
    assert identity == {"folder": str(moved.resolve()), "sha256": folder_sha256(moved)}

    class Hub:
        name_or_path = "org/model"

    assert model_identity(Hub()) == {"hub_id": "org/model", "revision": None}


# ---- divergence ------------------------------------------------------------------------------


def test_a_nan_loss_stops_training_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(esd, "prediction_loss", lambda pred, target: (pred.float() - target.float()).sum() * torch.nan)
    message = r"^esd: the loss became nan at iteration 1 of 2; .* lower lr \(now 0.01\)$"
    with pytest.raises(TrainingDiverged, match=message):
        _fit("esd", tiny_sd_pipeline(), "car", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_weights_that_blow_up_stop_training(tmp_path):
    pipe = tiny_sd_pipeline()
    with pytest.raises(TrainingDiverged, match=r"^receler: .* at iteration \d of 3; .*lower lr \(now 1e\+30\)$"):
        _fit("receler", pipe, "car", tmp_path / "ckpt", lr=1e30, iterations=3, checkpoint_every=100)
    assert not (tmp_path / "ckpt").exists()


# ---- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("method", ["receler", "esd", "eraseanything"])
def test_the_parameter_count_is_the_edits_trained_tensors(method, family):
    pipe = BUILDERS[family]()
    config = CONFIGS[method](iterations=1)
    edit = get_method(method).fit(pipe, "car", config, progress=False)
    trained = sum(t.numel() for k, t in edit.tensors.items() if k != "adversarial_prompt")
    assert edit.metrics["trainable_parameters"] == trained
    assert get_method(method).trainable_parameters(pipe, config) == trained
    assert edit.metrics["iterations"] == 1 and edit.metrics["resumed_from"] == 0


def test_receler_counts_flux_scale_erasers_without_allocating_them():
    from diffusers import FluxTransformer2DModel

    from erasekit.models import FamilyAdapter

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=19, num_single_layers=38)  # FLUX.1's block counts
    adapter = FamilyAdapter.for_denoiser(transformer)
    n = get_method("receler").trainable_parameters(adapter, RecelerConfig())
    points = receler.eraser_points(adapter)
    assert n == sum(2 * 128 * p.width + 128 + p.width for p in points) > 0


# ---- hooks -----------------------------------------------------------------------------------


def test_hooks_see_every_iteration_cap_rollouts_and_stop_early():
    class Seen(TrainingHooks):
        max_iterations = 2

        def __init__(self):
            self.events, self.rollouts = [], []

        def iteration_started(self, run, iteration):
            self.events.append(("start", iteration, run.iterations))

        def iteration_ended(self, run, iteration, record):
            self.events.append(("end", iteration, sorted(record)))

        def loop_ended(self, run):
            self.events.append(("loop_ended",))

        def rollout(self, source, t_enc):
            self.rollouts.append((t_enc, source.high))
            return super().rollout(source, 0)

    seen = Seen()
    with training_hooks(seen):
        edit = _fit("esd", tiny_sd_pipeline(), iterations=3, rollout_steps=3)
    assert seen.events == [
        ("start", 0, 3),
        ("end", 0, ["iteration", "loss"]),
        ("start", 1, 3),
        ("end", 1, ["iteration", "loss"]),
        ("loop_ended",),
    ]
    assert len(seen.rollouts) == 2 and all(high == 3 for _, high in seen.rollouts)
    assert edit.metrics["iterations"] == 2 and edit.metrics["rollout_denoiser_calls"] == 0


def test_a_trained_tensor_that_becomes_infinite_stops_the_loop(tmp_path):
    from erasekit.methods.training import TrainingRun

    weight = torch.nn.Parameter(torch.zeros(3))
    run = TrainingRun(
        tiny_sd_pipeline(),
        "esd",
        "weight_delta",
        "car",
        ESDConfig(lr=0.5, checkpoint_every=1),
        4,
        tmp_path,
        progress=False,
    )
    with pytest.raises(
        TrainingDiverged, match="a trained tensor became NaN or infinite at iteration 2 of 4; .*lower lr"
    ):
        for it in run.loop([weight], lambda: {"w": weight}):
            run.log(torch.tensor(1.0), loss=1.0)
            with torch.no_grad():
                weight[0] = float("inf") if it == 1 else 1.0
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 1  # not 2


def test_every_training_method_registers_its_iterations():
    from erasekit.methods import make_config

    assert get_method("receler").training_iterations(make_config("receler"), "sd", "car") == 500
    assert get_method("esd").training_iterations(make_config("esd-x"), "flux", "car") == 1400
    assert get_method("eraseanything").training_iterations(make_config("eraseanything"), "sd", "nudity") == 200
    assert get_method("uce").training_iterations(make_config("uce"), "sd", "car") == 0


# ---- where the time goes -------------------------------------------------------------------


def test_a_phase_inside_another_counts_for_itself_only(monkeypatch):
    from erasekit.methods import training
    from erasekit.methods.training import TrainingRun

    clock = iter([0.0, 1.0, 3.0, 6.0])  # outer opens, inner opens, inner closes, outer closes
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    run = TrainingRun(object(), "esd", "weight_delta", "car", ESDConfig(**ESD), 2)
    with run.phase("adversary"), run.phase("rollout"):
        pass
    assert dict(run.phase_seconds) == {"adversary": 1.0 + 3.0, "rollout": 2.0}


@pytest.mark.parametrize("method", ["esd", "receler", "eraseanything"])
def test_the_edit_says_where_its_training_time_went(method):
    pipe = tiny_sd_pipeline()
    edit = _fit(method, pipe)
    phases = edit.metrics["phase_seconds"]
    expected = {"rollout", "teacher", "student", "backward", "optimizer", "other"}
    assert expected | ({"adversary"} if method == "receler" else set()) == set(phases)
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(edit.metrics["train_seconds"], abs=0.05)
    # Every denoiser call of the loop is counted: rollouts plus at least a teacher and a student pass each.
    assert edit.metrics["denoiser_calls"] >= edit.metrics["rollout_denoiser_calls"] + 2 * edit.metrics["iterations"]
