"""``distill_until``: a run stops using its teacher after a share of its steps. Its config
checks, the step where it stops, the update after it (the plain ground-truth step, checked
against a hand-made SGD step), the teacher not run once every row of a lockstep group has
stopped, and the matting task's teacher_alpha weight moved onto alpha (the plain student's
loss) with the logged task loss still comparable."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_lockstep import TINY, count_teacher_forwards, toy_rows
from toy_task import ToyTask

from kdkit.compare import load_compare_config, method_runs
from kdkit.config import ConfigError, distill_steps, run_config_from_mapping
from kdkit.distributed import World
from kdkit.task import load_task
from kdkit.training.lockstep import train_lockstep
from kdkit.training.run import build_run
from kdkit.training.step import loss_terms, train_step
from tasks.matting.losses import alpha_prediction_loss


def _channel_row(tmp_path: Path, steps: int, until: float | None, **train) -> object:
    """The toy channel-similarity row (a teacher and one term through a 1×1 adapter)."""
    row = toy_rows(tmp_path, steps)[1]
    row.train = row.train.__class__(**{**row.train.__dict__, **train})
    row.distill_until = until
    return row


@pytest.mark.parametrize("until, steps, expected", [
    (None, 10, 10), (1.0, 10, 10), (0.5, 10, 5), (0.25, 10, 3), (0.01, 10, 1), (0.5, 4001, 2001),
])
def test_the_teacher_is_used_for_the_first_ceil_share_of_the_steps(tmp_path, until, steps,
                                                                      expected):
    assert distill_steps(_channel_row(tmp_path, steps, until)) == expected


def test_a_run_without_a_teacher_distils_for_no_step(tmp_path):
    assert distill_steps(toy_rows(tmp_path, 4)[0]) == 0


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_distill_until_outside_zero_to_one_is_refused_naming_the_key(tmp_path, value):
    row = toy_rows(tmp_path, 4)[1]
    data = {**row.to_dict(), "distill_until": value}
    with pytest.raises(ConfigError, match=r"distill_until: expected a number > 0 and <= 1"):
        run_config_from_mapping(data)


def test_distill_until_without_a_teacher_says_there_is_nothing_to_stop(tmp_path):
    data = {**toy_rows(tmp_path, 4)[0].to_dict(), "distill_until": 0.5}
    with pytest.raises(ConfigError, match="no teacher, so there is no distillation to stop"):
        run_config_from_mapping(data)


def test_after_the_stop_a_step_is_the_plain_ground_truth_sgd_step(tmp_path):
    config = _channel_row(tmp_path, 4, 0.5, optimizer="sgd")
    run = build_run(config, ToyTask(), World())
    teacher_calls = []
    run.teacher.register_forward_hook(lambda *args: teacher_calls.append(1))
    batches = run.data.batches(0)
    for _ in range(2):
        train_step(run, run.prepare(next(batches)))
    assert len(teacher_calls) == 2 and not run.distilling
    adapters = [p.detach().clone() for p in run.extras]
    batch = run.prepare(next(batches))
    # the expected update by hand: SGD with momentum 0.9 on the ground-truth loss alone
    reference = copy.deepcopy(run.model)
    loss = F.mse_loss(reference(batch["image"]).float(), batch["target"])
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    lr = run.optimizer.param_groups[0]["lr"]
    expected = []
    for param, grad in zip(run.model.parameters(), grads):
        velocity = 0.9 * run.optimizer.state[param]["momentum_buffer"] + grad
        expected.append(param.detach() - lr * velocity)

    task_terms, extra = loss_terms(run, batch)
    assert set(task_terms) == {"mse"} and extra == {}
    torch.testing.assert_close(task_terms["mse"], loss)
    train_step(run, batch)
    for param, value in zip(run.model.parameters(), expected):
        torch.testing.assert_close(param.detach(), value, rtol=1e-5, atol=1e-7)
    for param, before in zip(run.extras, adapters):  # no gradient: the adapter rests
        assert torch.equal(param.detach(), before)
    assert len(teacher_calls) == 2


def test_lockstep_runs_the_teacher_only_while_some_row_distils(tmp_path, monkeypatch):
    calls = count_teacher_forwards(monkeypatch)
    student, _ = toy_rows(tmp_path, 6)
    half = _channel_row(tmp_path, 6, 0.5)
    third = copy.deepcopy(half)
    third.out_dir, third.distill_until = str(tmp_path / "third"), 1 / 3
    train_lockstep([student, half, third], ToyTask(), progress=False)
    assert len(calls) == 2 + 3  # each distiller's sizing forward, then steps 0-2
    logged = [json.loads(line) for line in (Path(half.out_dir) / "log.jsonl").open()]
    steps = [(r["step"], "channel_similarity:body.3" in r) for r in logged
             if r.get("kind") == "train"]
    assert steps == [(1, True), (2, True), (3, True), (4, False), (5, False), (6, False)]


def test_a_matting_row_moves_its_teacher_weight_onto_the_ground_truth_term(tmp_path):
    config = load_compare_config(TINY, [
        "only=[student,hinton]", "base.train.steps=2", "base.train.batch_size=2",
        "base.data.train_length=4", "base.data.size=48", "base.data.crop_sizes=[32]",
        "base.data.output_size=32"])
    row = next(run for name, _, run, _ in method_runs(config) if name == "hinton")
    row.distill_until, row.out_dir = 0.5, str(tmp_path / "hinton")
    run = build_run(row, load_task("matting"), World())
    batches = run.data.batches(0)
    before = train_step(run, run.prepare(next(batches)))
    assert set(before.task_terms) == {"alpha", "teacher_alpha"}
    assert before.values()["task_loss"] == pytest.approx(before.values()["alpha"] / 0.5)
    assert run.loss_weights == {"alpha": 1.0, "teacher_alpha": 0.0}  # the plain student's
    batch = run.prepare(next(batches))
    reference = copy.deepcopy(run.model)  # the same weights and BN state, before the step
    after = train_step(run, batch)
    assert set(after.task_terms) == {"alpha"}
    expected = alpha_prediction_loss(reference(*run.task.model_inputs(batch)), batch["alpha"],
                                     batch["trimap"])
    torch.testing.assert_close(after.task_terms["alpha"].detach(), expected.detach())
    assert after.values()["task_loss"] == pytest.approx(after.values()["alpha"])
    assert row.loss == {"alpha": 0.5, "teacher_alpha": 0.5}  # the config is unchanged


def test_a_teacher_weight_with_no_ground_truth_term_to_move_onto_is_refused(tmp_path):
    data = {**toy_rows(tmp_path, 4)[1].to_dict(), "distill_until": 0.5,
            "loss": {"teacher_alpha": 0.5}}
    with pytest.raises(ConfigError, match="moves teacher_alpha's weight onto alpha .* set "
                                          "loss.alpha"):
        run_config_from_mapping(data)
