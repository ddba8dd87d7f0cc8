"""The parts of a training run, each with one job; :func:`kdkit.train.train` composes them.

- :mod:`~kdkit.training.folder`: the run folder: which files it holds, whether a config may
  resume it (what is safe to change), starting over, no half-made folder after a failure.
- :mod:`~kdkit.training.run`: build a :class:`~kdkit.training.run.Run` from a config (model,
  teacher, data, distiller, optimizer, schedule, loss scaler).
- :mod:`~kdkit.training.state`: what a checkpoint holds, both ways (save and restore).
- :mod:`~kdkit.training.step`: one optimizer step of a run on a batch, with the non-finite
  policy; returns the step's loss terms.
- :mod:`~kdkit.training.evaluation`: metrics of a model over a dataset.
- :mod:`~kdkit.training.runlog`: the run's log records, fanned out to ``log.jsonl`` and
  TensorBoard; the pace (ms per step) between logged steps.
- :mod:`~kdkit.training.batch`: moving (nested) batches to a device and memory format.

A step takes a built run and a batch, never closures over a loop's locals, so several runs
(students trained in lockstep on the same batches) compose from the same parts.
"""
