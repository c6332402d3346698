"""The CLI commands that run a worker here, with the worker Python the daemon would use: ``eval``
(one checkpoint, now), ``export`` (one checkpoint to a SavedModel, now) and ``doctor``."""

from __future__ import annotations

import json
import os
import sys

from oddaemon.cli.exit_codes import EXIT_OK, EXIT_REFUSED
from oddaemon.core import layout
from oddaemon.core.config import Config


def worker_job(config: Config, name: str) -> tuple[str, dict | None]:
    """The job's worker job file (what the daemon last gave its workers) and its spec; None (said
    on stderr) when it cannot be read."""
    job_json = layout.worker_job(config.state_dir, name)
    try:
        with open(job_json) as f:
            return job_json, json.load(f)["spec"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"oddaemon: cannot read job {name!r} ({job_json}): {exc}", file=sys.stderr)
        return job_json, None


def cmd_eval(config: Config, name: str, checkpoint: str, gpu: int | None, as_json: bool) -> int:
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from oddaemon.adapters.procs import worker_environment  # noqa: PLC0415

    job_json, spec = worker_job(config, name)
    if spec is None:
        return EXIT_REFUSED
    prefix = checkpoint if os.path.isabs(checkpoint) else os.path.join(spec["model_dir"], checkpoint)
    if not os.path.exists(prefix + ".index"):
        print(f"oddaemon: no checkpoint {prefix} ({prefix}.index does not exist)", file=sys.stderr)
        return EXIT_REFUSED
    with tempfile.TemporaryDirectory(prefix="oddaemon-eval-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        argv = [config.resolved_worker_python(), "-m", config.worker_module, "eval", "--job", job_json,
                "--checkpoint", prefix, "--result", result_path]
        env = worker_environment(dict(os.environ), (gpu,) if gpu is not None else ())
        code = subprocess.run(argv, env=env, stdout=sys.stderr, check=False).returncode
        if code != 0 or not os.path.exists(result_path):
            print(f"oddaemon: evaluation failed (exit status {code})", file=sys.stderr)
            return EXIT_REFUSED
        with open(result_path) as f:
            result = json.load(f)
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(f"{name} {os.path.basename(prefix)} step {result.get('step')}:")
        for key, value in sorted(result.get("metrics", {}).items()):
            print(f"  {key:<45} {value:.4f}")
    return EXIT_OK


def cmd_doctor(config: Config) -> int:
    """Run the workers' own check with the worker Python the daemon would use (the daemon never
    imports tensorflow; neither does this command)."""
    import subprocess  # noqa: PLC0415

    argv = [config.resolved_worker_python(), "-m", config.worker_module, "doctor"]
    for root in config.allowed_roots:
        argv += ["--root", root]
    print(f"oddaemon doctor: {' '.join(argv)}", flush=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    code = subprocess.run(argv, env=env, check=False).returncode
    return EXIT_OK if code == 0 else EXIT_REFUSED


def checkpoint_files(prefix: str) -> list[str]:
    """The files of checkpoint ``prefix`` (``STEM-N``) present now: its index and its data shards
    (``core.checkpoints.checkpoint_files``, the daemon's own rule)."""
    from oddaemon.core import checkpoints  # noqa: PLC0415

    directory, base = os.path.split(prefix)
    stem, _, n = base.rpartition("-")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    if not stem or not n.isdigit():
        return []
    return [os.path.join(directory, f) for f in checkpoints.checkpoint_files(names, int(n), stem) if f in names]


def snapshot_checkpoint(prefix: str, into: str) -> str:
    """Hard-link (or, across file systems, copy) checkpoint ``prefix``'s files into ``into``: TF's
    max_to_keep, or a new best swapped into best/, may delete them while an export reads them.
    Returns the snapshot's prefix; OSError when a file went away meanwhile."""
    import shutil  # noqa: PLC0415

    files = checkpoint_files(prefix)
    if not any(f.endswith(".index") for f in files) or not any(".data-" in f for f in files):
        raise FileNotFoundError(f"{prefix}: no .index with data shards beside it")
    for path in files:
        target = os.path.join(into, os.path.basename(path))
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return os.path.join(into, os.path.basename(prefix))


def cmd_export(config: Config, name: str, checkpoint: str | None, output: str) -> int:
    """Export one checkpoint of a job to a SavedModel in ``output`` now, in this process (the
    workers' export, as the daemon runs it): the best one (``model_dir/best``) unless ``checkpoint``
    names another. For a job that ran without ``export_best``, or a checkpoint other than the best."""
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from oddaemon.adapters.best_dir import BestDir  # noqa: PLC0415
    from oddaemon.adapters.procs import worker_environment  # noqa: PLC0415

    job_json, spec = worker_job(config, name)
    if spec is None:
        return EXIT_REFUSED
    model_dir = spec["model_dir"]
    if checkpoint is None:
        best = BestDir(model_dir).current()
        if best is None:
            print(f"oddaemon: job {name!r} has no best checkpoint yet ({model_dir}/best is empty: nothing "
                  "evaluated so far); name one with --checkpoint", file=sys.stderr)
            return EXIT_REFUSED
        checkpoint = os.path.join("best", f"ckpt-{best}")
    prefix = checkpoint if os.path.isabs(checkpoint) else os.path.join(model_dir, checkpoint)
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        print(f"oddaemon: --output {output} exists and is not an empty directory; give a new one", file=sys.stderr)
        return EXIT_REFUSED
    parent = os.path.dirname(output.rstrip("/")) or "/"
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".oddaemon-export-", dir=parent) as tmp:
            try:
                snapshot = snapshot_checkpoint(prefix, tmp)
            except OSError as exc:
                print(f"oddaemon: cannot read checkpoint {prefix} ({exc}); TF keeps only the newest "
                      f"checkpoint_max_to_keep: see `oddaemon status {name}` for those evaluated, or export the "
                      "best (no --checkpoint)", file=sys.stderr)
                return EXIT_REFUSED
            info = os.path.join(tmp, "info.json")
            with open(info, "w") as f:
                json.dump({"checkpoint": os.path.basename(prefix), "source": prefix, "job": name}, f)
            argv = [config.resolved_worker_python(), "-m", config.worker_module, "export", "--job", job_json,
                    "--checkpoint", snapshot, "--output", output, "--info", info]
            code = subprocess.run(argv, env=worker_environment(dict(os.environ), ()), stdout=sys.stderr,
                                  check=False).returncode
    except OSError as exc:
        print(f"oddaemon: cannot export into {output}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if code != 0 or not os.path.isfile(os.path.join(output, "export.json")):
        print(f"oddaemon: the export failed (exit status {code}); its output is above", file=sys.stderr)
        return EXIT_REFUSED
    print(f"{name} {os.path.basename(prefix)} exported to {output}")
    return EXIT_OK
