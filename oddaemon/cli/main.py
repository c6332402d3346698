"""The ``oddaemon`` command line.

Exit codes: 0 done; 1 the daemon refused (no such job, job already finished, ...) or doctor found
problems; 2 usage or
configuration error; 3 the daemon is not reachable; 4 the submitted file was rejected.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from oddaemon import __version__
from oddaemon.core.config import Config, load_config
from oddaemon.adapters.control import DaemonForbidden, DaemonUnreachable, request
from oddaemon.core.errors import OddaemonError, user_message
from oddaemon.cli.receipt import locate
from oddaemon.adapters.spool import Spool
from oddaemon.core.views import format_duration, progress_bar, sparkline

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REJECTED = 0, 1, 2, 3, 4
DEFAULT_CONFIG = "/etc/oddaemon/oddaemon.toml"


def config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    if os.environ.get("ODDAEMON_CONFIG"):
        return os.environ["ODDAEMON_CONFIG"]
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def socket_path(config: Config) -> str:
    return os.path.join(config.state_dir, "control.sock")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oddaemon", description="Run TensorFlow 2 Object Detection API training as a service.")
    p.add_argument("--config", "-c", help=f"daemon config file (default: $ODDAEMON_CONFIG, else {DEFAULT_CONFIG} if present, else built-in defaults)")
    p.add_argument("--version", action="version", version=f"oddaemon {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # -c/--config also after the subcommand (`oddaemon list -c X`); SUPPRESS keeps one given before it
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("--config", "-c", default=argparse.SUPPRESS, help="daemon config file")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[config_option], **kwargs)

    s = command("serve", help="run the daemon in the foreground")
    s.add_argument("--log-level", default="INFO")
    s = command("submit", help="submit a job file (atomic rename into the spool)")
    s.add_argument("file")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the daemon's verdict (0: don't)")
    for name, text in (("list", "list jobs"), ("status", "show one job"), ("cancel", "cancel a job"), ("retry", "retry a failed or cancelled job")):
        s = command(name, help=text)
        if name != "list":
            s.add_argument("name")
        if name in ("list", "status"):
            s.add_argument("--json", action="store_true", help="machine-readable output")
    s = command("logs", help="show a job's log (train by default; eval, export, preflight)")
    s.add_argument("name")
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("-n", "--lines", type=int, default=40)
    s.add_argument("--role", default="train", choices=("train", "eval", "export", "preflight"))
    s = command("eval", help="evaluate one checkpoint of a job now (a cold one-shot worker; prints the metrics)")
    s.add_argument("name")
    s.add_argument("--checkpoint", required=True, help="checkpoint prefix, absolute or relative to the job's model_dir "
                                                        "(e.g. ckpt-12 or best/ckpt-12)")
    s.add_argument("--gpu", type=int, help="GPU id to evaluate on (default: the CPU)")
    s.add_argument("--json", action="store_true", help="print the result JSON")
    command("doctor", help="check the workers' TF stack, the shims, GPUs and free disk; print what to fix")
    s = command("demo", help="run the bundled demo job with a local daemon (see README)")
    s.add_argument("--dir", default="demo", help="project folder for the demo's config, spool, state and logs")
    s.add_argument("--keep-serving", action="store_true", help="keep the daemon running after the demo job ends")
    s.add_argument("--standin", action="store_true", help="use the stand-in worker instead of TensorFlow (seconds, not minutes)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from oddaemon.cli.demo import run_demo  # noqa: PLC0415

            return run_demo(args.dir, args.keep_serving, args.standin)
        config = load_config(config_path(args.config))
        if args.command == "serve":
            return cmd_serve(config, args.log_level)
        if args.command == "submit":
            return cmd_submit(config, args.file, args.wait)
        if args.command == "logs":
            return cmd_logs(config, args.name, args.role, args.lines, args.follow)
        if args.command == "eval":
            return cmd_eval(config, args.name, args.checkpoint, args.gpu, args.json)
        if args.command == "doctor":
            return cmd_doctor(config)
        return cmd_control(config, args)
    except DaemonUnreachable as exc:
        print(f"oddaemon: {exc}", file=sys.stderr)
        print("oddaemon: without the daemon you can still submit (files wait in the spool) and read logs.", file=sys.stderr)
        return EXIT_UNREACHABLE
    except OddaemonError as exc:
        print(f"oddaemon: {user_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def setup_logging(level: str) -> None:
    from oddaemon.core.printable import EscapingFormatter  # noqa: PLC0415

    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter(fmt))  # nothing from outside reaches the log raw
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def cmd_serve(config: Config, level: str) -> int:
    from oddaemon.service.daemon import run  # noqa: PLC0415
    from oddaemon.adapters.loop import make_loop  # noqa: PLC0415

    setup_logging(level)
    return run(config, make_loop(config.event_loop))


def cmd_submit(config: Config, path: str, wait: float) -> int:
    """Deliver the file, then wait for the daemon's verdict on exactly that file (``receipt``)."""
    spool = Spool(config.spool_dir)
    delivery = spool.submit(path)
    print(f"submitted {path} -> {delivery.path}")
    try:
        request(socket_path(config), {"cmd": "ping"}, timeout=5)
    except DaemonForbidden:
        pass  # the socket is the daemon group's: whether it runs is not known; the spool will say
    except DaemonUnreachable as exc:
        print(f"oddaemon: {exc}", file=sys.stderr)
        print(f"oddaemon: the file waits in the spool ({delivery.path}); the daemon takes it when it starts",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if wait <= 0:
        return EXIT_OK
    deadline = time.monotonic() + wait
    where = locate(spool, delivery)
    checking = False
    while not where.decided and time.monotonic() < deadline:
        if where.place == "cur" and not checking:
            print("checking it ...", flush=True)
            checking = True
        time.sleep(0.05)
        where = locate(spool, delivery)
    if where.place == "new":
        print(f"the daemon has not taken it yet (after {wait:g}s); it stays in the spool until it does")
        return EXIT_OK
    if where.place == "cur":
        print(f"it is still being checked (after {wait:g}s); see `oddaemon list` and "
              "`oddaemon logs --role preflight NAME`")
        return EXIT_OK
    if where.place == "rejected":
        print(f"REJECTED (kept as {where.path}):")
        try:
            with open(where.error_path, encoding="utf-8", errors="replace") as f:
                print(f.read().rstrip())
        except OSError as exc:
            print(f"(its explanation {where.error_path} cannot be read: {exc.strerror})")
        return EXIT_REJECTED
    if where.place == "gone":
        print(f"oddaemon: {delivery.path} left the spool without a verdict (moved away by someone else?)",
              file=sys.stderr)
        return EXIT_REFUSED
    name = where.job_name
    try:
        reply = ask_daemon(config, {"cmd": "status", "name": name})
    except DaemonUnreachable:
        reply = {}
    job = reply.get("job") if reply.get("ok") else None
    if job is None:
        print(f"accepted as job {name} (kept as {where.path})")
    else:
        position = f", queue position {job['queue_position']}" if job.get("queue_position") else ""
        print(f"accepted as job {job['name']}: {job['state']}{position}")
    return EXIT_OK


def configured_bus(config: Config) -> str:
    return os.environ.get("ODDAEMON_DBUS_BUS") or config.dbus_bus


def ask_daemon(config: Config, payload: dict) -> dict:
    """One request, in the control socket's reply shape: over D-Bus when the daemon publishes its
    API there, else (or when the bus is not reachable, with a note saying so) the control socket."""
    bus = configured_bus(config)
    if bus != "none":
        try:
            from oddaemon.cli.dbus_client import Client, ClientError, DBusUnavailable  # noqa: PLC0415
        except ImportError as exc:
            print(f"oddaemon: D-Bus client unavailable ({exc}); using the control socket", file=sys.stderr)
        else:
            try:
                with Client.connect(bus) as client:
                    return _ask_dbus(client, payload)
            except DBusUnavailable as exc:
                from oddaemon.cli.dbus_client import describe_fallback  # noqa: PLC0415

                print(describe_fallback(str(exc), socket_path(config)), file=sys.stderr)
            except ClientError as exc:
                return {"ok": False, "error": str(exc)}
    return request(socket_path(config), payload)


def _ask_dbus(client, payload: dict) -> dict:
    cmd, name = payload["cmd"], payload.get("name")
    if cmd == "list":
        gpus = client.gpus()
        jobs = client.list_jobs()
        queue = [j["name"] for j in sorted((j for j in jobs if j["queue_position"]), key=lambda j: j["queue_position"])]
        return {"ok": True, "jobs": jobs, "gpus": gpus["total"], "free_gpus": gpus["free"], "queue": queue}
    if cmd == "status":
        return {"ok": True, "job": client.get_job(name)}
    if cmd == "cancel":
        return {"ok": True, "state": client.cancel(name)}
    if cmd == "retry":
        return {"ok": True, "state": client.retry(name)}
    raise ValueError(f"unknown command {cmd!r}")


def cmd_control(config: Config, args: argparse.Namespace) -> int:
    payload = {"cmd": args.command}
    if getattr(args, "name", None):
        payload["name"] = args.name
    reply = ask_daemon(config, payload)
    if not reply.get("ok"):
        print(f"oddaemon: {reply.get('error')}", file=sys.stderr)
        return EXIT_REFUSED
    if getattr(args, "json", False):
        print(json.dumps(reply.get("jobs", reply.get("job")), indent=1, sort_keys=True))
    elif args.command == "list":
        print(format_list(reply))
    elif args.command == "status":
        print(format_status(reply["job"]))
    else:
        print(f"{args.name}: {reply.get('state')}")
    return EXIT_OK


def shown(value: object) -> str:
    """A value for a person: ``-`` when it is not known (never ``None``)."""
    return "-" if value is None else str(value)


def format_list(reply: dict) -> str:
    rows = [f"{'NAME':<24} {'STATE':<10} {'GPUS':<6} {'STEP':>13} {'PROGRESS':<22} {'ETA':>7}  REASON"]
    for job in reply["jobs"]:
        gpus = ",".join(map(str, job["gpus"])) or ("cpu" if job["wants_gpus"] in (0, []) else "-")
        step, target = shown(job["step"]), shown(job["target_steps"])
        state = job["state"] + (f" #{job['queue_position']}" if job["queue_position"] else "")
        rows.append(f"{job['name']:<24} {state:<10} {gpus:<6} {step + '/' + target:>13} "
                    f"{progress_bar(job['progress']):<22} {format_duration(job['eta_seconds']):>7}  {job['reason']}")
    total, free = len(reply["gpus"]), len(reply["free_gpus"])
    rows.append(f"-- {len(reply['queue'])} queued; GPUs in use {total - free}/{total}")
    return "\n".join(rows)


def format_status(job: dict) -> str:
    lines = [f"{job['name']}: {job['state']} — {job['reason']}",
             f"  progress   {progress_bar(job['progress'], 30)} step {shown(job['step'])}/{shown(job['target_steps'])}"
             f"  ETA {format_duration(job['eta_seconds'])}",
             f"  gpus       {','.join(map(str, job['gpus'])) or 'none (CPU)'}   attempt {job['attempt']}, restarts {job['restarts']}"]
    if job["losses"]:
        lines.append("  losses     " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(job["losses"].items())))
    if job["learning_rate"] is not None:
        lines.append(f"  lr         {job['learning_rate']:.4g}   steps/s {job['steps_per_second'] or 0:.3g}")
    history = job.get("loss_history") or []
    if len(history) > 1:
        losses = [v for _, v in history]
        lines.append(f"  loss       {sparkline(losses)}  {losses[0]:.3g} -> {losses[-1]:.3g} (steps {history[0][0]}-{history[-1][0]})")
    lines += format_evaluation(job["evaluation"])
    lines += [f"  model_dir  {job['model_dir']}", f"  log        {job['train_log']}"]
    if job["last_exit"]:
        lines.append(f"  last exit  {job['last_exit']}")
    if job.get("failure"):
        lines.append(f"  failure    {job['failure']['kind']}: {job['failure']['message']}")
    for change in job.get("adjustments") or ():
        lines.append(f"  adjusted   {change}")
    lines.append("  history:")
    for h in job["history"][-8:]:
        lines.append(f"    {time.strftime('%H:%M:%S', time.localtime(h['time']))} {h['state']:<10} {h['reason']}")
    return "\n".join(lines)


def format_evaluation(ev: dict) -> list[str]:
    if not ev["enabled"]:
        return ["  eval       disabled"]
    checkpoints = ev["checkpoints"]
    if not checkpoints:
        return ["  eval       no checkpoint yet"]
    metric = ev["metric"]
    short = "mAP" if metric == "DetectionBoxes_Precision/mAP" else metric
    done = [c for c in checkpoints if c["value"] is not None]
    lines = []
    if len(done) > 1:
        values = [c["value"] for c in done]
        lines.append(f"  {short:<10} {sparkline(values)}  {values[0]:.3g} -> {values[-1]:.3g}")
    if ev["best"]:
        b = ev["best"]
        lines.append(f"  best       {b['checkpoint']} step {shown(b['step'])} {short} {b['value']:.4g}")
    if ev.get("pins", {}).get("released"):
        lines.append(f"  behind     {ev['pins']['released']} checkpoint(s) {ev['pins']['why']}")
    counts = ", ".join(f"{n} {state}" for state, n in ev["counts"].items() if n)
    lines.append(f"  checkpoints ({counts}):")
    lines.append(f"    {'CKPT':<10} {'STEP':>8} {'STATE':<10} {short:>10} {'LAG':>6} {'TOOK':>6}")
    for c in checkpoints[-12:]:
        value = f"{c['value']:.4f}" if c["value"] is not None else "-"
        mark = "  <- best" if c["best"] else (f"  ({c['error']})" if c["error"] else "")
        lines.append(f"    {c['checkpoint']:<10} {shown(c['step']):>8} {c['state']:<10} "
                     f"{value:>10} {format_duration(c['lag_seconds']):>6} {format_duration(c['duration_seconds']):>6}{mark}")
    total = ev.get("total", len(checkpoints))
    if total > 12:
        lines.append(f"    ... {total - 12} earlier checkpoint(s): oddaemon status --json lists the newest {len(checkpoints)}")
    return lines


def cmd_eval(config: Config, name: str, checkpoint: str, gpu: int | None, as_json: bool) -> int:
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from oddaemon.adapters.procs import worker_environment  # noqa: PLC0415

    job_json = os.path.join(config.state_dir, "work", name, "job.json")
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


def cmd_logs(config: Config, name: str, role: str, lines: int, follow: bool) -> int:
    path = os.path.join(config.log_dir, name, f"{role}.log")
    if not os.path.exists(path):
        print(f"oddaemon: no {role} log for job '{name}' at {path}", file=sys.stderr)
        return EXIT_REFUSED
    with open(path, "rb") as f:
        tail = f.read().splitlines()[-lines:] if lines > 0 else []
    sys.stdout.buffer.write(b"".join(line + b"\n" for line in tail))
    sys.stdout.flush()
    if follow:
        follow_file(path)
    return EXIT_OK


def follow_file(path: str) -> None:
    f = open(path, "rb")
    f.seek(0, os.SEEK_END)
    inode = os.fstat(f.fileno()).st_ino
    while True:
        chunk = f.read()
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            continue
        try:
            if os.stat(path).st_ino != inode:  # rotated: finish the old file, then follow the new one
                f.close()
                f = open(path, "rb")
                inode = os.fstat(f.fileno()).st_ino
                continue
        except FileNotFoundError:
            pass
        time.sleep(0.25)
