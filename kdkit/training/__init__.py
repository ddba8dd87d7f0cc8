"""The parts of a training run, each with one job; :func:`kdkit.train.train` composes them.

- :mod:`~kdkit.training.folder`: the run folder: which files it holds, whether a config may
  resume it (what is safe to change), starting over, no half-made folder after a failure.
- :mod:`~kdkit.training.run`: build a :class:`~kdkit.training.run.Run` from a config (model,
  teacher, data, distiller, optimizer, schedule, loss scaler).
- :mod:`~kdkit.training.state`: what a checkpoint holds, both ways (save and restore).
- :mod:`~kdkit.training.step`: one optimizer step of a run on a batch (a non-finite one
  skipped without a host synchronisation on CUDA), and the non-finite policy.
- :mod:`~kdkit.training.evaluation`: metrics of a model over a dataset.
- :mod:`~kdkit.training.runlog`: the run's log records, fanned out to ``log.jsonl`` and
  TensorBoard; the pace (ms per step) between logged steps.
- :mod:`~kdkit.training.batch`: moving (nested) batches to a device and memory format;
  cuDNN autotuning for training steps.
- :mod:`~kdkit.training.randomness`: each run's own random stream.
- :mod:`~kdkit.training.session`: one run as a loop sees it (folder, run, log) and the
  bookkeeping after each step and at the end.
- :mod:`~kdkit.training.lockstep`: several runs on one data stream with one teacher forward
  per batch; which rows may share, and how many fit the device.
- :mod:`~kdkit.training.budget`: the steps that fit a comparison's time budget.

A step takes a built run and a batch, never closures over a loop's locals, so several runs
(students trained in lockstep on the same batches) compose from the same parts.
"""
