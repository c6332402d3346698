"""What ``oddaemon list`` and ``oddaemon status`` print: tables and status text from the daemon's job views."""

from __future__ import annotations

import time

from oddaemon.core.views import format_duration, progress_bar, sparkline


def shown(value: object) -> str:
    """A value for a person: ``-`` when it is not known (never ``None``)."""
    return "-" if value is None else str(value)


def format_list(reply: dict) -> str:
    rows = [f"{'NAME':<24} {'STATE':<10} {'GPUS':<6} {'STEP':>13} {'PROGRESS':<22} {'ETA':>7}  REASON"]
    for job in reply["jobs"]:
        gpus = ",".join(map(str, job["gpus"])) or ("cpu" if job["wants_gpus"] in (0, []) else "-")
        step, target = shown(job["step"]), shown(job["target_steps"])
        state = job["state"] + (f" #{job['queue_position']}" if job["queue_position"] else "")
        member = f"[sweep {job['sweep']['name']}] " if job.get("sweep") else ""
        member += slurm_tag(job.get("slurm"))
        rows.append(f"{job['name']:<24} {state:<10} {gpus:<6} {step + '/' + target:>13} "
                    f"{progress_bar(job['progress']):<22} {format_duration(job['eta_seconds']):>7}  "
                    f"{member}{job['reason']}")
    total, free = len(reply["gpus"]), len(reply["free_gpus"])
    waiting = sum(1 for job in reply["jobs"] if job["state"] == "waiting")
    rows.append(f"-- {len(reply['queue'])} queued; " + (f"{waiting} waiting for other jobs; " if waiting else "")
                + f"GPUs in use {total - free}/{total}")
    return "\n".join(rows)


def slurm_tag(slurm: dict | None) -> str:
    """``[slurm 41 RUNNING node1]``: the job's train (else export) Slurm job, for a list row."""
    if not slurm:
        return ""
    role = "train" if "train" in slurm else sorted(slurm)[0]
    job = slurm[role]
    where = f" {job['nodes']}" if job["nodes"] else ""
    return f"[slurm {shown(job['job_id'])} {job['state']}{where}{'' if role == 'train' else ' ' + role}] "


def slurm_lines(slurm: dict | None) -> list[str]:
    """``oddaemon status``: each of the job's Slurm jobs (its last one, once it ended)."""
    lines = []
    for role, job in sorted((slurm or {}).items()):
        why = f" ({job['reason']})" if job["reason"] and job["reason"] != "None" else ""
        where = f" on {job['nodes']}" if job["nodes"] else ""
        lines.append(f"  slurm      {role}: job {shown(job['job_id'])} {job['state']}{why}{where}"
                     f" (attempt {job['attempt']})")
    return lines


def format_value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else shown(value)


def format_sweep(sweep: dict) -> str:
    """``oddaemon sweep NAME``: one row per variant (its values, state, best metric and its step)."""
    halving = sweep["halving"]
    lines = [f"sweep {sweep['name']}: {sweep['state']} — {sweep['variants']} variants ({sweep['method']}), "
             f"metric {sweep['metric']} ({'higher' if sweep['higher_is_better'] else 'lower'} is better)"
             + (f", halving at steps {', '.join(map(str, halving['steps']))} keeping {halving['keep_fraction']:g}"
                if halving else "")]
    keys = sweep["keys"]
    widths = [max(10, len(k)) for k in keys]
    header = f"  {'NAME':<24} " + " ".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True)) + \
        f" {'STATE':<10} {'STEP':>13} {'BEST':>9} {'AT STEP':>8}  REASON"
    lines.append(header)
    for row in sweep["rows"]:
        mark = "*" if row["best"] else " "
        step = f"{shown(row['step'])}/{shown(row['target_steps'])}"
        lines.append(f"{mark} {row['name']:<24} " + " ".join(f"{format_value(row['values'].get(k)):>{w}}"
                                                             for k, w in zip(keys, widths, strict=True))
                     + f" {row['state']:<10} {step:>13} {format_value(row['best_value']):>9} "
                     f"{shown(row['best_step']):>8}  {row['reason']}")
    best = sweep["best"]
    if best is None:
        lines.append("  best: none evaluated yet")
    else:
        values = ", ".join(f"{k} = {format_value(v)}" for k, v in best["values"].items())
        lines.append(f"  best: {best['name']} ({values})"
                     f" {sweep['metric']} {format_value(best['value'])} at step {shown(best['step'])}, "
                     f"{best['best_dir']}" + (f", exported to {best['exported']}" if best["exported"] else ""))
    return "\n".join(lines)


def format_sweeps(sweeps: list[dict]) -> str:
    """``oddaemon sweep``: every sweep in one line."""
    rows = [f"{'SWEEP':<24} {'STATE':<10} {'VARIANTS':>8} {'BEST':>9}  BEST VARIANT"]
    for s in sweeps:
        rows.append(f"{s['name']:<24} {s['state']:<10} {s['variants']:>8} {format_value(s['best_value']):>9}  "
                    f"{shown(s['best'])}")
    return "\n".join(rows)


def format_status(job: dict) -> str:
    lines = [f"{job['name']}: {job['state']} — {job['reason']}",
             f"  progress   {progress_bar(job['progress'], 30)} step {shown(job['step'])}/{shown(job['target_steps'])}"
             f"  ETA {format_duration(job['eta_seconds'])}",
             f"  gpus       {','.join(map(str, job['gpus'])) or 'none (CPU)'}   "
             f"attempt {job['attempt']}, restarts {job['restarts']}"]
    lines += slurm_lines(job.get("slurm"))
    if job.get("sweep"):
        member = job["sweep"]
        lines.append(f"  sweep      {member['name']} #{member['index']}: "
                     + ", ".join(f"{k} = {format_value(v)}" for k, v in member["values"].items()))
    if job.get("after"):
        pending = job.get("waiting_for") or []
        lines.append(f"  after      {', '.join(job['after'])}"
                     + (f"   (waiting for {', '.join(pending)})" if pending else ""))
    if job["losses"]:
        lines.append("  losses     " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(job["losses"].items())))
    if job["learning_rate"] is not None:
        lines.append(f"  lr         {job['learning_rate']:.4g}   steps/s {job['steps_per_second'] or 0:.3g}")
    history = job.get("loss_history") or []
    if len(history) > 1:
        losses = [v for _, v in history]
        lines.append(f"  loss       {sparkline(losses)}  {losses[0]:.3g} -> {losses[-1]:.3g} "
                     f"(steps {history[0][0]}-{history[-1][0]})")
    lines += format_evaluation(job["evaluation"])
    if job.get("resources"):  # its workers' cgroups (per-job cgroups)
        from oddaemon.core.resources import usage_line  # noqa: PLC0415 (dataclasses: `list` needs none of it)

        for role, usage in job["resources"].items():
            lines.append(f"  resources  {usage_line(role, usage)}")
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
                     f"{value:>10} {format_duration(c['lag_seconds']):>6} "
                     f"{format_duration(c['duration_seconds']):>6}{mark}")
    total = ev.get("total", len(checkpoints))
    if total > 12:
        lines.append(f"    ... {total - 12} earlier checkpoint(s): "
                     f"oddaemon status --json lists the newest {len(checkpoints)}")
    return lines
