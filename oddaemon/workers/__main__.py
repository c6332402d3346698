"""``python -m oddaemon.workers COMMAND ...``: dispatch to the worker modules (see __init__)."""

from __future__ import annotations

import argparse
import sys

from oddaemon.workers import EXIT_FAILED, WorkerError, err, exit_on_sigterm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m oddaemon.workers",
                                     description="oddaemon's TF2 Object Detection API workers")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or resume) the job's model")
    train.add_argument("--job", required=True)
    evaluate = commands.add_parser("eval", help="evaluate exactly one checkpoint")
    for option in ("--job", "--checkpoint", "--result"):
        evaluate.add_argument(option, required=True)
    serve = commands.add_parser("eval-serve", help="the warm evaluator: checkpoints as JSON lines on stdin")
    serve.add_argument("--job", required=True)
    serve.add_argument("--reply-fd", type=int, required=True)
    export = commands.add_parser("export", help="export one checkpoint to a SavedModel")
    for option in ("--job", "--checkpoint", "--output"):
        export.add_argument(option, required=True)
    export.add_argument("--info", help="JSON whose fields go into the export's export.json")
    preflight = commands.add_parser("preflight", help="check a job's inputs before it is queued")
    for option in ("--job", "--result"):
        preflight.add_argument(option, required=True)
    preflight_serve = commands.add_parser("preflight-serve", help="the warm preflight: jobs as JSON lines on stdin")
    preflight_serve.add_argument("--reply-fd", type=int, required=True)
    doctor = commands.add_parser("doctor", help="check the TF stack of this Python environment")
    doctor.add_argument("--root", action="append", default=[], help="report free disk space under PATH")
    doctor.add_argument("--min-free-gb", type=float, default=2.0)
    demo = commands.add_parser("generate-demo", help="write a small synthetic data set")
    from oddaemon.workers.demo_data import build_parser as demo_parser

    demo_parser(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # first: before anything (numpy's OpenBLAS, tensorflow) starts a thread
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    args = build_parser().parse_args(argv)
    from oddaemon.workers import compat

    try:
        if args.command != "doctor":  # the doctor applies them itself and reports failures
            compat.apply()
        if args.command == "train":
            from oddaemon.workers import train

            try:
                return train.run(args)
            except Exception as exc:  # name the failure for the daemon, then fail as before
                _explain(args.job, exc)
                raise
        if args.command == "eval":
            from oddaemon.workers import evaluate

            return evaluate.run(args)
        if args.command == "eval-serve":
            from oddaemon.workers import evaluate

            return evaluate.serve(args)
        if args.command == "export":
            from oddaemon.workers import export

            return export.run(args)
        if args.command == "preflight":
            from oddaemon.workers import preflight

            return preflight.run(args)
        if args.command == "preflight-serve":
            from oddaemon.workers import preflight

            return preflight.serve(args)
        if args.command == "doctor":
            from oddaemon.workers import doctor

            return doctor.run(args)
        from oddaemon.workers import demo_data as generate

        return generate.run(args)
    except WorkerError as exc:
        err(f"oddaemon.workers {args.command}: {exc}")
        return exc.code


def _explain(job_path: str, exc: BaseException) -> None:
    from oddaemon.workers import diagnose, load_job

    try:
        job = load_job(job_path)
    except WorkerError:
        job = None
    line = diagnose.explain(job, exc)
    if line:
        err(line)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(EXIT_FAILED)
