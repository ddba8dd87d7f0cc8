"""The training loop's parts one by one: the run folder (what may resume it, starting over,
no half-made folder), checkpoint state both ways, the non-finite policy's message, the
log's sinks (log.jsonl, TensorBoard), ms per step and the task loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_reliability import toy_run
from toy_task import ToyNet, ToyTask

from kdkit.checkpoint import load_checkpoint, load_state, save_atomic
from kdkit.config import ConfigError, run_config_from_mapping
from kdkit.distributed import World
from kdkit.errors import CheckpointError, KdkitError, NonFiniteLossError, RunFolderError
from kdkit.train import read_log, train
from kdkit.training.folder import resume_problems
from kdkit.training.run import build_run
from kdkit.training.runlog import Pace
from kdkit.training.state import checkpoint_state, restore_state
from kdkit.training.step import check_finite, ground_truth_loss, train_step


def _train(run: dict, **options) -> dict:
    return train(run_config_from_mapping(run), ToyTask(), progress=False, **options)


def _config(**changes) -> object:
    run = toy_run(Path("run"))
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (run[section] if section else run)[leaf] = value
    return run_config_from_mapping(run)


# -- what may resume a run ---------------------------------------------------------------


def test_only_safe_keys_may_change_on_resume():
    old = _config()
    safe = _config(**{"out_dir": "moved", "train.log_every": 3, "train.eval_every": 2,
                      "train.checkpoint_every": 1, "train.num_workers": 2,
                      "train.device": "cpu", "train.log": ["jsonl", "tensorboard"]})
    assert resume_problems(old, safe, checkpoint_step=4) == []
    problems = resume_problems(old, _config(**{"train.lr": 0.02, "model.width": 8}), 4)
    assert problems == ["model.width: 4 → 8", "train.lr: 0.01 → 0.02"]


def test_steps_may_change_with_the_constant_schedule_only_and_not_below_the_checkpoint():
    cosine = resume_problems(_config(), _config(**{"train.steps": 9}), checkpoint_step=4)
    assert cosine == ["train.steps: 6 → 9 (with schedule: cosine the steps set every step's "
                      "learning rate; only the constant schedule may change them)"]
    constant = _config(**{"train.schedule": "constant"})
    for steps, allowed in ((9, True), (4, True), (3, False)):
        new = _config(**{"train.schedule": "constant", "train.steps": steps})
        assert (resume_problems(constant, new, checkpoint_step=4) == []) == allowed


def test_a_changed_config_is_refused_naming_the_keys_and_the_way_out(tmp_path):
    _train(toy_run(tmp_path / "run", steps=2))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(RunFolderError) as error:
        _train(toy_run(tmp_path / "run", steps=2, lr=0.02))
    message = str(error.value)
    assert "train.lr: 0.01 → 0.02" in message and "--no-resume" in message
    assert "resume=False" in message
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


def test_a_finished_run_returns_its_metrics_and_fewer_steps_are_refused(tmp_path):
    first = _train(toy_run(tmp_path / "run", steps=4))
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert _train(toy_run(tmp_path / "run", steps=4, log_every=2)) == first
    assert (tmp_path / "run" / "log.jsonl").read_text() == log  # nothing trained or logged
    with pytest.raises(RunFolderError, match=r"train\.steps: 4 → 2 \(with schedule: cosine"):
        _train(toy_run(tmp_path / "run", steps=2))


def test_a_wrong_architecture_is_a_short_error_and_leaves_the_config(tmp_path):
    _train(toy_run(tmp_path / "run", steps=2))
    (tmp_path / "run" / "config.yaml").unlink()  # a folder without its config
    wrong = toy_run(tmp_path / "run", steps=2)
    wrong["model"] = {"width": 8}
    with pytest.raises(CheckpointError) as error:
        _train(wrong)
    message = str(error.value)
    assert "does not fit ToyNet" in message and "body.0.weight (8, 3, 3, 3) vs" not in message
    assert "body.0.weight (4, 3, 3, 3) vs (8, 3, 3, 3)" in message
    assert len(message) < 600 and "\n" not in message
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_load_state_names_the_first_keys_only():
    state = {f"extra{i}": torch.zeros(1) for i in range(9)}
    with pytest.raises(CheckpointError, match=r"unexpected extra0, .*extra4 and 4 more"):
        load_state(ToyNet(4), {**ToyNet(4).state_dict(), **state}, "file.pt")


def test_a_failed_run_leaves_no_half_made_folder(tmp_path):
    run = toy_run(tmp_path / "new" / "run")
    run["data"]["poison"] = [5]
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written yet"):
        _train(run)
    assert not (tmp_path / "new" / "run").exists()


def test_the_stop_message_names_the_last_checkpoint(tmp_path):
    run = toy_run(tmp_path / "run", checkpoint_every=1, steps=16)
    run["data"]["poison"] = [5]
    with pytest.raises(NonFiniteLossError) as error:
        _train(run)
    step = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"]
    assert f"The last checkpoint (step {step}) is intact" in str(error.value)
    assert (tmp_path / "run").exists()


def test_no_resume_deletes_checkpoint_weights_and_log_only(tmp_path):
    _train(toy_run(tmp_path / "run", steps=4))
    (tmp_path / "run" / "notes.txt").write_text("mine")
    _train(toy_run(tmp_path / "run", steps=2, lr=0.02), resume=False)
    assert [r["step"] for r in read_log(tmp_path / "run", "train")] == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """What an interrupted run logged after its checkpoint is dropped on resume."""
    _train(toy_run(tmp_path / "run", steps=4, schedule="constant"))
    with open(tmp_path / "run" / "log.jsonl", "a") as log:  # logged, then killed
        log.write('{"kind": "train", "step": 5, "total": -1.0}\n')
    _train(toy_run(tmp_path / "run", steps=6, schedule="constant"))
    records = read_log(tmp_path / "run", "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["total"] > 0 for r in records)
    assert [r["step"] for r in read_log(tmp_path / "run", "eval")] == [4, 6]


# -- checkpoint state, part by part -------------------------------------------------------


def test_checkpoint_state_round_trips_into_a_fresh_run(tmp_path):
    config = run_config_from_mapping(toy_run(tmp_path / "run", optimizer="sgd"))
    run = build_run(config, ToyTask(), World())
    batches = run.data.batches(0)
    for _ in range(2):
        train_step(run, run.prepare(next(batches)))
    state = checkpoint_state(run)
    assert state["step"] == 2 and len(state["rng"]) == 1
    fresh = build_run(config, ToyTask(), World())
    restore_state(fresh, state, Path("checkpoint.pt"))
    assert fresh.step == fresh.last_checkpoint == 2
    for name, value in run.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], value)
    assert fresh.schedule.state_dict()["last_epoch"] == 2
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["momentum_buffer"],
                       run.optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(fresh.random.cpu, state["rng"][0])


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path):
    run = build_run(run_config_from_mapping(toy_run(tmp_path / "run")), ToyTask(), World())
    state = checkpoint_state(run)
    state["rng"] = state["rng"] * 2
    with pytest.raises(CheckpointError, match="written by 2 process"):
        restore_state(run, state, Path("checkpoint.pt"))


# -- the log -------------------------------------------------------------------------------


class _Clock:
    """A clock that advances one second per reading."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_pace_divides_by_the_steps_since_the_last_lap(monkeypatch):
    monkeypatch.setattr(Pace, "clock", staticmethod(_Clock()))
    pace = Pace(step=5)  # reads 1 s
    assert pace.lap(12) == pytest.approx(1e3 / 7)  # 2 s: one second over 7 steps
    assert pace.lap(13) == pytest.approx(1e3)


def test_ms_per_step_counts_the_steps_since_the_last_log(tmp_path, monkeypatch):
    """Logged at 4 and at the final step 6: 2 steps in the last interval, not log_every."""
    monkeypatch.setattr(Pace, "clock", staticmethod(_Clock()))
    _train(toy_run(tmp_path / "run", log_every=4))
    records = read_log(tmp_path / "run", "train")
    assert [r["step"] for r in records] == [4, 6]
    assert [r["ms_per_step"] for r in records] == pytest.approx([1e3 / 4, 1e3 / 2])


def test_train_records_carry_the_unweighted_task_loss_without_distillation_terms(tmp_path):
    teacher = tmp_path / "teacher.pt"
    save_atomic({"model": ToyNet(8).state_dict()}, teacher)
    run = toy_run(tmp_path / "run", steps=2)
    run["loss"] = {"mse": 0.25}
    run["teacher"] = {"model": {"width": 8}, "checkpoint": str(teacher)}
    run["distillation"] = [{"loss": "channel_similarity", "student": "body",
                            "teacher": "body", "adapter": "conv1x1", "weight": 5.0}]
    _train(run)
    for record in read_log(tmp_path / "run", "train"):
        assert record["task_loss"] == pytest.approx(record["mse"] / 0.25)
        assert record["total"] == pytest.approx(record["mse"] + record["channel_similarity:body"])


def test_ground_truth_loss_undoes_each_weight_and_leaves_teacher_terms_out():
    terms = {"alpha": torch.tensor(0.5 * 3.0), "composition": torch.tensor(2.0),
             "teacher_alpha": torch.tensor(0.5 * 7.0)}
    spec = {"alpha": 0.5, "teacher_alpha": 0.5}  # composition: unnamed, weight 1
    assert float(ground_truth_loss(terms, spec)) == pytest.approx(3.0 + 2.0)


def test_tensorboard_gets_the_same_scalars_as_the_jsonl_log(tmp_path):
    accumulator = pytest.importorskip(  # kdkit[tensorboard]; in the dev extra, so CI has it
        "tensorboard.backend.event_processing.event_accumulator")
    EventAccumulator = accumulator.EventAccumulator

    _train(toy_run(tmp_path / "run", log=["jsonl", "tensorboard"], eval_every=3))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    train_records = read_log(tmp_path / "run", "train")
    for name in ("total", "task_loss", "mse", "lr", "ms_per_step"):
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [r["step"] for r in train_records]
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in train_records])
    assert [s.step for s in events.Scalars("eval/metric")] == [3, 6]


def test_tensorboard_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(KdkitError, match=r'pip install "kdkit\[tensorboard\]"'):
        _train(toy_run(tmp_path / "run", log=["tensorboard"]))
    assert not (tmp_path / "run").exists()


def test_unknown_log_sinks_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.log\[1\].*Valid values: jsonl, tensorboard"):
        run_config_from_mapping(toy_run(tmp_path / "run", log=["jsonl", "csv"]))


# -- non-finite steps skipped on the device, read every log_every steps -------------------


@pytest.fixture
def device_skips(monkeypatch):
    """The CUDA path on the CPU: the fused optimizer skips flagged steps on the device and
    the flags are read every log_every steps; returns the list of check sizes read."""
    from kdkit.training import run as run_module
    from kdkit.training import session as session_module

    monkeypatch.setattr(run_module, "skips_on_device", lambda device: True)
    reads = []

    def counting_check(run):
        reads.append(len(run.unchecked))
        return check_finite(run)

    monkeypatch.setattr(session_module, "check_finite", counting_check)
    return reads


def test_poisoned_steps_are_skipped_on_the_device_and_named_when_read(tmp_path, device_skips):
    from test_reliability import _steps_with

    run = toy_run(tmp_path / "skip", on_nonfinite="skip", steps=8, log_every=4)
    run["data"]["poison"] = [5]
    _train(run)
    assert device_skips == [4, 4]  # read twice, four steps each: no per-step sync
    skipped = read_log(tmp_path / "skip", "skip")
    assert [r["step"] for r in skipped] == _steps_with(5, 2)
    assert skipped[0]["terms"] == ["mse"]
    checkpoint = load_checkpoint(tmp_path / "skip" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    # the fused Adam undid its step count on the skipped steps: no update was applied
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {8 - 2}


def test_a_poisoned_step_read_later_still_stops_naming_term_and_step(tmp_path, device_skips):
    from test_reliability import _steps_with

    run = toy_run(tmp_path / "nan", steps=8, log_every=8)
    run["data"]["poison"] = [5]
    with pytest.raises(NonFiniteLossError, match=rf"'mse'.* at step {_steps_with(5, 1)[0]};"
                                                 r".* No checkpoint was written yet"):
        _train(run)
    assert device_skips == [8]


def test_the_host_reads_every_step_on_the_cpu(tmp_path, monkeypatch):
    from kdkit.training import session as session_module

    reads = []
    monkeypatch.setattr(session_module, "check_finite",
                        lambda run: reads.append(len(run.unchecked)) or check_finite(run))
    _train(toy_run(tmp_path / "cpu", steps=4, log_every=4))
    assert reads == [1, 1, 1, 1]


# -- each run's own random stream, cuDNN autotuning for training steps ------------------


def test_each_run_draws_from_its_own_stream_whatever_steps_in_between():
    from kdkit.training.randomness import RandomStream

    cpu = torch.device("cpu")
    alone = RandomStream.seeded(3, 0, cpu)
    with alone.active():
        expected = [torch.rand(2) for _ in range(3)]
    outer = torch.get_rng_state()
    first, other = RandomStream.seeded(3, 0, cpu), RandomStream.seeded(4, 0, cpu)
    drawn = []
    for _ in range(3):  # interleaved with another run's draws and with global draws
        with first.active():
            drawn.append(torch.rand(2))
        with other.active():
            torch.rand(5)
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    assert torch.equal(torch.get_rng_state(), outer)  # the global stream is left alone


def test_cudnn_autotunes_training_steps_only():
    from kdkit.training.batch import cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark(torch.device("cuda"), True):
        assert torch.backends.cudnn.benchmark
        with cudnn_benchmark(torch.device("cuda"), False):  # evaluation inside training
            assert not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with cudnn_benchmark(torch.device("cpu"), True):
        assert torch.backends.cudnn.benchmark == before


def test_with_loss_scaling_the_scaler_skips_a_poisoned_step_on_the_device(tmp_path,
                                                                          device_skips):
    config = run_config_from_mapping(toy_run(tmp_path / "fp16", steps=2))
    run = build_run(config, ToyTask(), World())
    run.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # fp16's scaler, on the CPU
    batch = run.prepare(next(run.data.batches(0)))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    batch["image"][0, 0, 0, 0] = float("nan")
    train_step(run, batch)
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert run.scaler.get_scale() == 2.0  # it saw the non-finite gradients
    run.settings.on_nonfinite = "skip"
    assert check_finite(run) == [(1, ["mse"])]
