"""The CLI commands that run a worker here, with the worker Python the daemon would use: ``eval``
(one checkpoint, now) and ``doctor``."""

from __future__ import annotations

import json
import os
import sys

from oddaemon.cli.exit_codes import EXIT_OK, EXIT_REFUSED
from oddaemon.core import layout
from oddaemon.core.config import Config


def cmd_eval(config: Config, name: str, checkpoint: str, gpu: int | None, as_json: bool) -> int:
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from oddaemon.adapters.procs import worker_environment  # noqa: PLC0415

    job_json = layout.worker_job(config.state_dir, name)
    try:
        with open(job_json) as f:
            spec = json.load(f)["spec"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"oddaemon: cannot read job {name!r} ({job_json}): {exc}", file=sys.stderr)
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
