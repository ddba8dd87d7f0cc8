"""The ``kdkit`` command line.

A :class:`~kdkit.errors.KdkitError` (a bad config, data, checkpoint or run folder; a run
that failed) prints one line, ``kdkit COMMAND: message``, on stderr and exits with
:data:`EXIT_BAD_INPUT` (2, as argparse's usage errors) or :data:`EXIT_RUN_FAILED` (1, for
:data:`RUN_FAILURES`); ``--debug`` shows its traceback instead. A run stopped by a signal
(:class:`~kdkit.errors.Interrupted`: checkpointed, nothing lost) prints the command that
resumes it and exits with ``128 + signal`` (143 for SIGTERM, 130 for Ctrl-C, 138 for
SIGUSR1). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kdkit.errors import ConfigError, Interrupted, KdkitError, KernelFailure, NonFiniteLossError

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
#: Errors of a run that started from valid inputs and then failed; the rest are bad inputs.
RUN_FAILURES = (NonFiniteLossError, KernelFailure)


def _demo(args: argparse.Namespace) -> int:
    from kdkit.demo import run_demo

    run_demo(steps=args.steps, seed=args.seed, size=args.size, batch=args.batch)
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    import torch

    from kdkit import bench, kernels

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kdkit bench kernels: --device cuda was asked for, but no CUDA device is "
              "visible here; run with --device cpu", file=sys.stderr)
        return 2
    backends = args.backends or kernels.native_backends(device.type)
    batch = args.batch or (16 if device.type == "cuda" else 2)
    cases = bench.paper_cases(batch)
    if args.crops:
        cases = [c for c in cases if any(c.name.startswith(f"{crop}²") for crop in args.crops)]
    results, ceilings = bench.run_benchmarks(device, batch, args.repeats, backends,
                                             args.accumulate, cases)
    command = "kdkit " + " ".join(args.argv)
    md, csv_path = bench.write_report(results, ceilings, device, Path(args.out),
                                      command.strip(), batch)
    print(md.read_text())
    print(f"wrote {md} and {csv_path}")
    failed = [r for r in results if r.note.startswith("failed")]
    for r in failed:
        print(f"{r.case} / {r.backend} / {r.accumulate}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


def _run_config(args: argparse.Namespace):
    from kdkit.config import load_run_config

    overrides = list(args.set or [])
    if getattr(args, "out", None):
        overrides.append(f"out_dir={args.out}")
    return load_run_config(args.config, overrides)


def _print_metrics(metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        print(f"{name:>8}: {value:.6g}")


def _train(args: argparse.Namespace) -> int:
    from kdkit.task import load_task
    from kdkit.train import train

    run = _run_config(args)
    metrics = train(run, load_task(run.task), resume=not args.no_resume,
                    progress=not args.quiet)
    if args.quiet:  # with progress on, train() has printed them
        _print_metrics(metrics)
    return 0


def _load_trained(args: argparse.Namespace):
    from kdkit.checkpoint import load_weights
    from kdkit.task import load_task
    from kdkit.train import build_model, resolve_device

    run = _run_config(args)
    task = load_task(run.task)
    device = resolve_device(run.train.device)
    model = load_weights(build_model(task, run.model), args.checkpoint).to(device).eval()
    return run, task, model, device


def _eval(args: argparse.Namespace) -> int:
    from kdkit.train import evaluate

    run, task, model, device = _load_trained(args)
    _, eval_set = task.datasets(run.data)
    _print_metrics(evaluate(task, model, eval_set, run, device, progress=not args.quiet))
    return 0


def _predict(args: argparse.Namespace) -> int:
    run, task, model, device = _load_trained(args)
    if not hasattr(task, "predict"):
        raise ConfigError(f"the task {run.task!r} does not implement predict")
    written = task.predict(model, args.image, args.guide, args.output, run.data, device,
                           args.long_side)
    print(f"wrote {len(written)} prediction(s) to {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from kdkit.export import export_onnx, has_onnxruntime

    run, task, model, _ = _load_trained(args)
    path = export_onnx(model, task.flops_inputs(*args.size), args.output)
    checked = ("checked against PyTorch with onnxruntime" if has_onnxruntime()
               else "not checked: install onnxruntime to compare it with PyTorch")
    print(f"wrote {path} (dynamic batch, height and width; {checked})")
    return 0


def _compare_argv(args: argparse.Namespace) -> list[str]:
    """The ``kdkit`` arguments of this comparison (config, ``--set``, ``--out``, ``--w2``,
    ``--no-lockstep``, ``--quiet``), for the commands a plan gives."""
    return ["compare", args.config, *(["--set", *args.set] if args.set else []),
            *(["--out", args.out] if args.out else []),
            *(["--w2", *map(repr, args.w2)] if args.w2 else []),
            *(["--no-lockstep"] if args.no_lockstep else []),
            *(["--quiet"] if args.quiet else [])]


def _write_plan(args: argparse.Namespace, config, task) -> int:
    """``--plan FILE``: write the comparison's entries and say how to run them."""
    import json

    from kdkit.compare import comparison_entries
    from kdkit.compare_plan import plan_document

    entries, argv = comparison_entries(config, task, args.w2), _compare_argv(args)
    document = plan_document(entries, argv, config.out_dir)
    Path(args.plan).parent.mkdir(parents=True, exist_ok=True)
    Path(args.plan).write_text(json.dumps(document, indent=1) + "\n")
    levels = "; ".join(f"level {level['level']}: " + (
        f"entry {level['first']}" if level["first"] == level["last"]
        else f"entries {level['first']}-{level['last']}") for level in document["levels"])
    print(f"wrote {args.plan}: {len(entries)} entries ({levels})\n"
          f"run one:     {shlex.join(['kdkit', *argv, '--entry', 'I'])}  "
          "(after the entries of its depends_on: those of earlier levels)\n"
          f"then report: {document['report']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from kdkit.compare import comparison_entries, load_compare_config, run_compare
    from kdkit.compare_plan import run_one
    from kdkit.errors import StaleRunError
    from kdkit.task import load_task
    from kdkit.training.budget import parse_duration
    from kdkit.training.stop import stop_signals

    overrides = list(args.set or []) + ([f"out_dir={args.out}"] if args.out else [])
    config = load_compare_config(args.config, overrides)
    if args.budget is not None:
        parse_duration(args.budget, "--budget")
        config.budget = args.budget
    if args.no_lockstep:
        config.lockstep = False
    config.report.setdefault("command", "kdkit " + " ".join(args.argv))
    task = load_task(config.task)
    if args.plan is not None:
        return _write_plan(args, config, task)
    try:
        if args.entry is not None:
            entries = comparison_entries(config, task, args.w2)
            with stop_signals():  # a signal stops the entry's run in flight, checkpointed
                print(run_one(entries, args.entry, task, config.lockstep, _compare_argv(args),
                              progress=not args.quiet))
        else:
            run_compare(config, task, args.w2, progress=not args.quiet)
    except StaleRunError as error:  # its advice names `kdkit train`: say it for compare
        raise StaleRunError(
            error.problem, f"delete that row's folder to train the row again (the other "
            f"rows keep their runs), delete {config.out_dir} to start the whole comparison "
            f"over, or pass --out NEW_FOLDER") from None
    return 0


def _prune(args: argparse.Namespace) -> int:
    from kdkit.config import load_yaml
    from kdkit.dcp import prune_run
    from kdkit.task import load_task

    spec = load_yaml(args.config)
    task = load_task(spec.get("task", "") if isinstance(spec, dict) else "")
    prune_run(spec, task, Path(args.config).parent, progress=not args.quiet)
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from kdkit.data import empty_output_folder
    from kdkit.task import load_task

    task = load_task(args.task)
    out = empty_output_folder(args.out, args.overwrite)
    folder = task.write_synthetic(str(out), args.n, args.size, args.seed, args.backgrounds)
    print(f"wrote {args.n} samples and a contact sheet to {folder}")
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse prints the error with the option)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}")
    return value


def _debug_flag() -> argparse.ArgumentParser:
    """A parent parser with ``--debug``, for ``kdkit`` and each command, so it is accepted
    before and after the command (no default: a command's copy leaves ``kdkit --debug``'s
    value alone; ``kdkit`` itself defaults it to False)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
    return parent


def _add_run_arguments(parser: argparse.ArgumentParser, checkpoint: bool) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                        help="override config values, e.g. train.steps=20 data.size=64")
    if checkpoint:
        parser.add_argument("--checkpoint", required=True, help="model.pt or checkpoint.pt")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from kdkit.task import registered_tasks

    parser = argparse.ArgumentParser(
        prog="kdkit", description="Knowledge distillation for dense prediction.",
        parents=[_debug_flag()],  # its own copy: set_defaults changes the action it holds
    )
    parser.set_defaults(debug=False)
    debug = _debug_flag()
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="distil a small timm student from a timm teacher on generated data",
        parents=[debug])
    demo.add_argument(
        "--steps", type=int, default=120, help="training steps per student (teacher: twice)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=64, help="image side in pixels")
    demo.add_argument("--batch", type=int, default=32)
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="micro-benchmarks")
    targets = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
    from kdkit.kernels import BACKENDS as SIMILARITY_BACKENDS
    from kdkit.kernels.common import ACCUMULATE, DEFAULT_ACCUMULATE

    kernels = targets.add_parser(
        "kernels", help="time the similarity backends at the papers' shapes, write a table",
        parents=[debug])
    kernels.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    kernels.add_argument("--batch", type=int, help="default: 16 on cuda, 2 on cpu")
    kernels.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    kernels.add_argument("--backends", nargs="+", choices=list(SIMILARITY_BACKENDS),
                         help="default: those that run natively on --device")
    precisions = [DEFAULT_ACCUMULATE, *ACCUMULATE]  # auto (the default), then the forced ones
    kernels.add_argument("--accumulate", nargs="+", choices=precisions, default=precisions,
                         help="Gram precisions to time (default: all)")
    kernels.add_argument("--crops", nargs="+", type=int, choices=[320, 640, 1024],
                         help="only these crop sizes (default: all)")
    kernels.add_argument("--out", default="docs/benchmarks", help="report folder")
    kernels.set_defaults(run=_bench_kernels)

    train = commands.add_parser("train", help="train (or distil) a model from a run config",
                                parents=[debug])
    _add_run_arguments(train, checkpoint=False)
    train.add_argument("--out", help="output folder (overrides out_dir)")
    train.add_argument("--no-resume", action="store_true",
                       help="start over: delete this run folder's checkpoint, weights and "
                            "logs (log.jsonl, tensorboard/) first (needed when the config "
                            "changed in more than the safe keys)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate trained weights on the test set",
                                   parents=[debug])
    _add_run_arguments(evaluate, checkpoint=True)
    evaluate.set_defaults(run=_eval)

    predict = commands.add_parser("predict", help="predict with trained weights",
                                  parents=[debug])
    _add_run_arguments(predict, checkpoint=True)
    predict.add_argument("--image", required=True, help="an image file or a folder of them")
    predict.add_argument("--guide",
                         help="per-image guides, for tasks that take one (such as a trimap): a "
                              "file, or a folder of them named like the images")
    predict.add_argument("--output", required=True, help="folder for the predictions")
    predict.add_argument("--long-side", type=int, metavar="PIXELS",
                         help="run the network on each image resized so that its longer side "
                              "has PIXELS pixels (a model trained on small crops then sees a "
                              "photo at the scale it learned); predictions are written at "
                              "full resolution (default: the network sees full resolution)")
    predict.set_defaults(run=_predict)

    export = commands.add_parser("export", help="write trained weights as an ONNX model",
                                 parents=[debug])
    _add_run_arguments(export, checkpoint=True)
    export.add_argument("--output", required=True, help="the .onnx file to write")
    export.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                        help="example input size for tracing (the graph takes any size)")
    export.set_defaults(run=_export)

    compare = commands.add_parser(
        "compare", help="train and evaluate every method of a comparison, write a report",
        parents=[debug])
    compare.add_argument("config", help="compare config (YAML)")
    compare.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                         help="override config values, e.g. base.train.steps=50 seeds=[0,1]")
    compare.add_argument("--out", help="output folder (overrides out_dir)")
    compare.add_argument("--w2", nargs="+", type=float,
                         help="sweep the distillation weight: every feature method is run "
                              "with its term weights multiplied by each value")
    compare.add_argument("--budget", metavar="DURATION",
                         help="fit the teacher, every row and every seed into this time (90s, "
                              "8m, 1h or seconds): a short warm-up measures the steps, then "
                              "the same number of steps is chosen for every student row")
    compare.add_argument("--no-lockstep", action="store_true",
                         help="train the rows one after another (default: the rows of a seed "
                              "together, on one data stream with one teacher forward per batch)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    jobs = compare.add_mutually_exclusive_group()
    jobs.add_argument("--plan", metavar="FILE",
                      help="write the comparison's entries (the teacher, each prune job, each "
                           "lockstep group or row of each seed) with their dependencies and "
                           "the command that runs each, as JSON, and exit")
    jobs.add_argument("--entry", type=int, metavar="I",
                      help="run entry I of the plan (e.g. $SLURM_ARRAY_TASK_ID) into the "
                           "comparison's folders and exit; once every entry has finished, "
                           "kdkit compare CONFIG writes the report without retraining")
    compare.set_defaults(run=_compare)

    prune = commands.add_parser(
        "prune", help="DCP: sparsify (train) a student, prune its channels, save it",
        parents=[debug])
    prune.add_argument("config", help="prune config (YAML)")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    prune.set_defaults(run=_prune)

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_commands.add_parser("synth", help="write a synthetic dataset as PNG folders",
                                     parents=[debug])
    synth.add_argument("--task", required=True,
                       help="the task whose data to generate: "
                            f"{', '.join(sorted(registered_tasks())) or 'none registered'}, "
                            "or a dotted path module:Class")
    synth.add_argument("--out", required=True,
                       help="the folder to write (image/, its companions, contact_sheet.png); "
                            "must be empty or new, unless --overwrite")
    synth.add_argument("--overwrite", action="store_true",
                       help="delete the samples already in --out first")
    synth.add_argument("--n", type=_positive_int, default=200, help="number of samples")
    synth.add_argument("--size", type=_positive_int, default=512,
                       help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0,
                       help="seed of the first sample (sample i uses seed + i)")
    synth.add_argument("--backgrounds", default=None,
                       help="matting: natural (bundled photos, the default), procedural, or "
                            "a folder of .jpg/.png photos")
    synth.set_defaults(run=_data_synth)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """``kdkit train``, ``kdkit data synth``, … for the one-line error."""
    words = (args.command, getattr(args, "target", None), getattr(args, "data_command", None))
    return " ".join(["kdkit", *filter(None, words)])


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted ``kdkit`` call: the same arguments without
    ``--no-resume`` (which would start over)."""
    return shlex.join(["kdkit", *(a for a in argv if a != "--no-resume")])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except Interrupted as error:
        if args.debug:
            raise
        print(f"{_command_name(args)}: {error}; resume with: {resume_command(argv)}",
              file=sys.stderr)
        return 128 + error.signal
    except KdkitError as error:
        if args.debug:
            raise
        print(f"{_command_name(args)}: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED if isinstance(error, RUN_FAILURES) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
