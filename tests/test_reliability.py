"""Training reliability: multi-process data parallelism (gloo, 2 processes), bit-exact
resume after SIGKILL, checksummed and code-free checkpoints and configs, non-finite
losses, torch.compile, channels-last and bf16 autocast."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from toy_task import ToyNet, ToyTask

from kdkit.checkpoint import load_checkpoint, save_atomic
from kdkit.config import ConfigError, load_run_config, load_yaml, run_config_from_mapping
from kdkit.errors import NonFiniteLossError
from kdkit.sampling import ResumableSampler
from kdkit.train import read_log, train

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
       "OMP_NUM_THREADS": "1"}


def toy_run(out: Path, **train_settings) -> dict:
    return {"task": "toy_task:ToyTask", "model": {"width": 4}, "out_dir": str(out),
            "data": {"length": 16}, "train": {"steps": 6, "batch_size": 4, "log_every": 1,
                                               "lr": 0.01, **train_settings}}


def _weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "model.pt")["model"]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(config: Path, processes: int = 2) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "kdkit", "train", str(config), "--quiet"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# -- multi-process data parallelism ----------------------------------------------------


def test_sampler_shards_are_disjoint_equal_and_cover_the_epoch():
    shards = [list(ResumableSampler(10, seed=3, rank=r, size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    indices = [i for shard in shards for _, i in shard]
    assert sorted(indices) == list(range(10))
    single = [i for _, i in ResumableSampler(10, seed=3)]
    assert [i for _, i in shards[0]] == single[0::2]  # rank r takes every 2nd from r


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """2 ranks × batch 2 with gradient averaging = 1 process × batch 4 (no BatchNorm)."""
    single = tmp_path / "single"
    train(run_config_from_mapping(toy_run(single)), ToyTask(), progress=False)
    ddp = tmp_path / "ddp"
    _torchrun(_write(tmp_path / "ddp.yaml", toy_run(ddp, batch_size=2)))
    for name, value in _weights(single).items():
        torch.testing.assert_close(_weights(ddp)[name], value, rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in read_log(ddp, "train")]
    assert steps == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes the log
    # each rank evaluated half the test set; torchmetrics combined the halves
    assert read_log(ddp, "eval")[-1]["metric"] == pytest.approx(
        read_log(single, "eval")[-1]["metric"], rel=1e-5)


def _distilled(out: Path, gather: bool, teacher: Path, batch: int) -> dict:
    """SGD, whose update scales with the gradient (Adam's would not notice gradients summed
    instead of averaged over the processes)."""
    run = toy_run(out, batch_size=batch, optimizer="sgd", lr=0.05)
    run["teacher"] = {"model": {"width": 8}, "checkpoint": str(teacher)}
    run["distillation"] = [
        {"loss": "batch_similarity", "student": "body", "teacher": "body",
         "args": {"gather": gather}, "weight": 10.0},
        {"loss": "channel_similarity", "student": "body", "teacher": "body",
         "adapter": "conv1x1"},
    ]
    return run


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    """The student's weights and the distillation adapters' at the end of a run."""
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    adapters = checkpoint["distiller"]["adapters"]
    return {**checkpoint["model"], **{f"adapters.{k}": v for k, v in adapters.items()}}


def test_batch_similarity_gathers_the_global_batch_across_processes(tmp_path):
    """Also the adapters' gradients (outside DDP) are averaged over the processes."""
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pt"
    save_atomic({"model": ToyNet(8).state_dict()}, teacher)
    single = tmp_path / "single"
    train(run_config_from_mapping(_distilled(single, False, teacher, 4)), ToyTask(),
          progress=False)
    for gather in (True, False):
        out = tmp_path / f"ddp-{gather}"
        _torchrun(_write(tmp_path / f"{gather}.yaml", _distilled(out, gather, teacher, 2)))
        close = {k: torch.allclose(_trained(out)[k], v, rtol=1e-5, atol=1e-6)
                 for k, v in _trained(single).items()}
        # gathered: the same map as one process over the global batch (adapters averaged
        # too); per-process maps are a different loss
        assert all(close.values()) == gather, close


def _dropout_run(out: Path, **settings) -> dict:
    """The toy task with dropout (training draws from torch's global generator), evaluated
    every 3 steps (after the checkpoint of step 3 in the stopped run)."""
    run = toy_run(out, schedule="constant", eval_every=3, **settings)
    return {**run, "task": "dropout_task:DropoutTask"}


def test_resume_restores_the_random_stream(tmp_path):
    """Stopped after 3 steps and resumed to 6 = 6 steps at once, dropout masks included."""
    from dropout_task import DropoutTask

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train(run_config_from_mapping(_dropout_run(whole)), DropoutTask(), progress=False)
    for steps in (3, 6):
        train(run_config_from_mapping(_dropout_run(halves, steps=steps)), DropoutTask(),
              progress=False)
    for name, value in _weights(whole).items():
        assert torch.equal(_weights(halves)[name], value), name


def test_each_process_resumes_its_own_random_stream(tmp_path):
    """Two processes draw different dropout masks; the checkpoint keeps both streams and
    each process resumes its own (not rank 0's)."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    _torchrun(_write(tmp_path / "whole.yaml", _dropout_run(whole, batch_size=2)))
    _torchrun(_write(tmp_path / "3.yaml", _dropout_run(halves, batch_size=2, steps=3)))
    streams = load_checkpoint(halves / "checkpoint.pt")["rng"]
    assert len(streams) == 2 and not torch.equal(streams[0], streams[1])
    _torchrun(_write(tmp_path / "6.yaml", _dropout_run(halves, batch_size=2, steps=6)))
    for name, value in _weights(whole).items():
        torch.testing.assert_close(_weights(halves)[name], value, rtol=1e-5, atol=1e-6)


# -- crash safety ------------------------------------------------------------------------

MATTING = {
    "task": "matting",
    "model": {"name": "dim", "encoder_channels": [[4], [8], [8], [8], [8]],
              "decoder_channels_dim": [8, 8, 8, 4, 1]},
    "data": {"kind": "synthetic", "train_length": 64, "test_length": 2, "size": 48,
             "crop_sizes": [32, 40], "output_size": 32},
    "train": {"steps": 150, "batch_size": 4, "log_every": 5, "checkpoint_every": 10,
              "lr": 0.002},
}


def _kdkit_train(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdkit", "train", str(config), "--quiet",
                             *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_run_killed_mid_way_resumes_to_the_same_weights(tmp_path):
    """Random crops and trimaps are keyed to (seed, epoch, index) and the model, optimizer,
    schedule and RNG are checkpointed: kill -9 then resume = an uninterrupted run."""
    whole = _write(tmp_path / "whole.yaml", {**MATTING, "out_dir": str(tmp_path / "whole")})
    assert _kdkit_train(whole).wait(timeout=300) == 0
    killed_dir = tmp_path / "killed"
    killed = _write(tmp_path / "killed.yaml", {**MATTING, "out_dir": str(killed_dir)})
    process = _kdkit_train(killed)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
            r["step"] >= 25 for r in read_log(killed_dir, "train")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "model.pt").exists(), "the run finished before it was killed"
    stopped_at = load_checkpoint(killed_dir / "checkpoint.pt")["step"]
    assert 20 <= stopped_at < 150
    assert _kdkit_train(killed).wait(timeout=300) == 0
    for name, value in _weights(tmp_path / "whole").items():
        assert torch.equal(_weights(killed_dir)[name], value), name


def test_a_flipped_bit_or_a_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"model": {"w": torch.randn(256, 256)}, "step": 3}, path)
    assert load_checkpoint(path)["step"] == 3
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt: its tensors do not match the checksum"):
        load_checkpoint(path)
    path.write_bytes(bytes(data[:middle]))
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_checkpoint(path)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "payload": _Exploit(marker)}, path, pickle_module=pickle)
    with pytest.raises(ValueError, match="would run code are refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_config_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "run.yaml"
    path.write_text(f"task: matting\nmodel: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="could not parse YAML"):
        load_run_config(path)
    with pytest.raises(ConfigError):
        load_yaml(path)
    assert not marker.exists()


# -- non-finite losses -----------------------------------------------------------------


def _steps_with(index: int, epochs: int, length: int = 16, batch: int = 4) -> list[int]:
    """The (1-based) steps whose batch holds sample ``index``, epoch by epoch (seed 0)."""
    sampler, steps = ResumableSampler(length, seed=0), []
    for epoch in range(epochs):
        sampler.epoch = epoch
        order = [i for _, i in sampler]
        steps.append(epoch * (length // batch) + order.index(index) // batch + 1)
    return steps


def test_a_nan_loss_stops_the_run_naming_the_term_and_step(tmp_path):
    run = toy_run(tmp_path / "nan")
    run["data"]["poison"] = [5]
    expected = _steps_with(5, 1)[0]
    with pytest.raises(NonFiniteLossError, match=rf"'mse'.* at step {expected};"):
        train(run_config_from_mapping(run), ToyTask(), progress=False)


def test_a_nan_loss_can_skip_the_step_instead(tmp_path):
    run = toy_run(tmp_path / "skip", on_nonfinite="skip", steps=8)
    run["data"]["poison"] = [5]
    metrics = train(run_config_from_mapping(run), ToyTask(), progress=False)
    skipped = read_log(tmp_path / "skip", "skip")
    assert [r["step"] for r in skipped] == _steps_with(5, 2)
    assert skipped[0]["terms"] == ["mse"]
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "skip").values())
    assert metrics["metric"] == metrics["metric"]  # finite evaluation after the skips


# -- compile, channels-last, bf16 ---------------------------------------------------------


@pytest.mark.parametrize("distil", [False, True])
def test_compiled_training_step_matches_eager(tmp_path, distil):
    """The compiled student (with distillation: its hooks still record features)."""
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pt"
    save_atomic({"model": ToyNet(8).state_dict()}, teacher)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    for out, settings in ((eager, {}), (compiled, {"compile": True,
                                                   "compile_backend": "aot_eager"})):
        run = _distilled(out, False, teacher, 4) if distil else toy_run(out)
        run["train"].update(settings)
        train(run_config_from_mapping(run), ToyTask(), progress=False)
    for name, value in _weights(eager).items():
        torch.testing.assert_close(_weights(compiled)[name], value, rtol=1e-5, atol=1e-6)


def test_channels_last_and_bf16_autocast(tmp_path):
    ToyTask.seen.clear()
    run = toy_run(tmp_path / "bf16", channels_last=True, amp=True, amp_dtype="bf16")
    metrics = train(run_config_from_mapping(run), ToyTask(), progress=False)
    assert ToyTask.seen and all(seen == (torch.bfloat16, True) for seen in ToyTask.seen)
    assert all(v.dtype == torch.float32 for v in _weights(tmp_path / "bf16").values())
    assert metrics["metric"] < 1.0
    with pytest.raises(ConfigError, match=r"train\.amp_dtype: unknown amp_dtype 'fp8'"):
        train(run_config_from_mapping(toy_run(tmp_path / "x", amp_dtype="fp8")), ToyTask())
