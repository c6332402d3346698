"""Prometheus metrics: one custom collector over an immutable snapshot of the daemon's state.

The main loop builds a snapshot (plain dicts) at most once a second when something changed and
publishes it with a single reference assignment; the HTTP server thread of prometheus_client
turns whatever snapshot is current into metric families on each scrape. The collector keeps no
state of its own and never touches the daemon, so a scrape cannot block the event loop.

Conventions: ``oddaemon_`` prefix, base units, ``_total`` counters, ``_seconds``; the per-job
label is ``job_name`` (``job`` is Prometheus's own target label); finished jobs are exported only
up to ``[metrics] max_finished_jobs`` / ``finished_job_max_age_seconds``. Per-job resources are the
one exception to "no I/O at scrape time": the snapshot lists the live workers' cgroups, whose files
(``adapters/cgroups.read_usage``) are read by the scrape itself.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from oddaemon import __version__
from oddaemon.adapters.cgroups import read_usage
from oddaemon.core.states import TERMINAL, JobState
from oddaemon.core.sweep import best_variant, group_by_sweep

Snapshot = dict


def select_jobs(views: list[dict], now: float, max_finished: int, max_age: float) -> list[dict]:
    """Active jobs, plus the most recently finished ones within the bounds."""
    active = [v for v in views if JobState(v["state"]) not in TERMINAL]
    finished = [v for v in views if JobState(v["state"]) in TERMINAL
                and (v["finished_at"] is None or now - v["finished_at"] <= max_age)]
    finished.sort(key=lambda v: v["finished_at"] or 0, reverse=True)
    return active + finished[:max_finished]


def build_snapshot(views: list[dict], gpus: dict, counters: dict, started_at: float, now: float,
                   max_finished: int, max_age: float, cgroups: dict | None = None) -> Snapshot:
    """``cgroups``: ``{"backend": "v2" | "v1" | "none", "groups": [(job, role, Group)], "daemon": Group | None}``."""
    by_state = {s.value: 0 for s in JobState}
    for v in views:
        by_state[v["state"]] += 1
    jobs = select_jobs(views, now, max_finished, max_age)
    return {"time": now, "started_at": started_at, "jobs_by_state": by_state,
            "queue_length": sum(1 for v in views if v["state"] == JobState.QUEUED.value),
            "gpus": gpus, "counters": counters, "jobs": jobs, "sweeps": sweep_bests(views, jobs),
            "cgroups": cgroups or {"backend": "none", "groups": [], "daemon": None}}


def sweep_bests(views: list[dict], exported: list[dict]) -> list[dict]:
    """Each sweep with a variant among the exported jobs: its best variant, value and step (the best
    among all its variants, exported or not). One series per sweep and metric: bounded by the jobs."""
    shown = {v["sweep"]["name"] for v in exported if v.get("sweep")}
    bests = []
    for name, variants in group_by_sweep(views).items():
        best = best_variant(variants) if name in shown else None
        if best is not None:
            b = best["evaluation"]["best"]
            bests.append({"sweep": name, "job_name": best["name"], "metric": best["evaluation"]["metric"],
                          "value": b["value"], "step": b["step"]})
    return bests


class SnapshotCollector(Collector):
    def __init__(self, get_snapshot: Callable[[], Snapshot | None]):
        self.get_snapshot = get_snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.get_snapshot()
        info = InfoMetricFamily("oddaemon_build", "oddaemon build information")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        if snap is None:
            return
        yield from self._daemon(snap)
        yield from self._jobs(snap)
        yield from _resources(snap["cgroups"])
        yield from self._sweeps(snap)

    @staticmethod
    def _daemon(snap: Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily("oddaemon_start_time_seconds", "When the daemon started (Unix time)",
                                value=snap["started_at"])
        jobs = GaugeMetricFamily("oddaemon_jobs", "Jobs known to the daemon, by state", labels=["state"])
        for state, n in snap["jobs_by_state"].items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("oddaemon_queue_length", "Jobs waiting for GPUs or a CPU slot",
                                value=snap["queue_length"])
        gpus = snap["gpus"]
        yield GaugeMetricFamily("oddaemon_gpus", "GPUs the daemon may hand out", value=len(gpus["total"]))
        yield GaugeMetricFamily("oddaemon_gpus_allocated", "GPUs held by a job's training or evaluator",
                                value=len(gpus["total"]) - len(gpus["free"]))
        holder = GaugeMetricFamily("oddaemon_gpu_allocated", "1 for each GPU held, with the job and role holding it",
                                   labels=["gpu", "job_name", "role"])
        for gpu, (name, role) in sorted(gpus["holders"].items()):
            holder.add_metric([str(gpu), name, role], 1)
        yield holder
        c = snap["counters"]
        yield CounterMetricFamily("oddaemon_spool_rejected_files", "Spool files rejected since the daemon started",
                                  value=c["rejected_files"])
        yield CounterMetricFamily("oddaemon_worker_restarts", "Train worker restarts since the daemon started",
                                  value=c["worker_restarts"])
        yield CounterMetricFamily("oddaemon_checkpoints_evaluated",
                                  "Checkpoint evaluations completed since the daemon started",
                                  value=c["checkpoints_evaluated"])
        notes = CounterMetricFamily("oddaemon_notifications", "Notifications since the daemon started, by target "
                                    "and result (sent; failed after its tries; dropped unsent, the queue was full)",
                                    labels=["target", "result"])
        for (target, result), n in sorted(c.get("notifications", {}).items()):
            notes.add_metric([target, result], n)
        yield notes

    @staticmethod
    def _jobs(snap: Snapshot) -> Iterator[Metric]:
        g = {
            "state": GaugeMetricFamily("oddaemon_job_state", "1 for the job's current state",
                                       labels=["job_name", "state"]),
            "step": GaugeMetricFamily("oddaemon_job_train_step", "Latest training step", labels=["job_name"]),
            "target": GaugeMetricFamily("oddaemon_job_target_steps", "Training steps to run (num_steps)",
                                        labels=["job_name"]),
            "progress": GaugeMetricFamily("oddaemon_job_progress_ratio", "step / target_steps", labels=["job_name"]),
            "rate": GaugeMetricFamily("oddaemon_job_steps_per_second", "Training speed", labels=["job_name"]),
            "eta": GaugeMetricFamily("oddaemon_job_eta_seconds", "Estimated seconds of training left",
                                     labels=["job_name"]),
            "loss": GaugeMetricFamily("oddaemon_job_loss", "Latest training loss by component",
                                      labels=["job_name", "component"]),
            "lr": GaugeMetricFamily("oddaemon_job_learning_rate", "Latest learning rate", labels=["job_name"]),
            "gpus": GaugeMetricFamily("oddaemon_job_gpus", "GPUs held by the job's training", labels=["job_name"]),
            "after": GaugeMetricFamily("oddaemon_job_dependencies_pending",
                                       "While the job is waiting: the jobs it waits for (after) that have not "
                                       "succeeded yet", labels=["job_name"]),
            "ckpt_step": GaugeMetricFamily("oddaemon_job_latest_checkpoint_step",
                                           "Step of the newest evaluated checkpoint", labels=["job_name"]),
            "ckpt_time": GaugeMetricFamily("oddaemon_job_latest_checkpoint_timestamp_seconds",
                                           "When the newest checkpoint became complete (Unix time)",
                                           labels=["job_name"]),
            "checkpoints": GaugeMetricFamily("oddaemon_job_checkpoints", "Checkpoints by evaluation state",
                                             labels=["job_name", "state"]),
            "pending": GaugeMetricFamily("oddaemon_job_checkpoints_pending_evaluation",
                                         "Complete checkpoints not evaluated yet", labels=["job_name"]),
            "released": GaugeMetricFamily("oddaemon_job_checkpoints_released",
                                          "Checkpoints released unevaluated to keep the pins within their disk "
                                          "budget (the evaluator is behind)", labels=["job_name"]),
            "eval_step": GaugeMetricFamily("oddaemon_job_last_evaluated_step", "Step of the latest evaluation",
                                           labels=["job_name"]),
            "eval_metric": GaugeMetricFamily("oddaemon_job_eval_metric",
                                             "Metrics of the latest evaluation (COCO, eval losses)",
                                             labels=["job_name", "metric"]),
            "best": GaugeMetricFamily("oddaemon_job_best_metric_value", "Best value of the job's [eval] metric",
                                      labels=["job_name", "metric"]),
            "best_step": GaugeMetricFamily("oddaemon_job_best_metric_step", "Step of the best checkpoint",
                                           labels=["job_name"]),
            "lag": GaugeMetricFamily("oddaemon_job_eval_lag_seconds",
                                     "Latest evaluation: checkpoint complete -> evaluation start", labels=["job_name"]),
            "took": GaugeMetricFamily("oddaemon_job_eval_duration_seconds", "Latest evaluation's duration",
                                      labels=["job_name"]),
            "failure": GaugeMetricFamily("oddaemon_job_failure", "1 while the job is in backoff or failed; kind: "
                                         "its latest failure (oom, nan, input, checkpoint, gpu, storage, hung, "
                                         "signal, exit, refused)",
                                         labels=["job_name", "kind"]),
        }
        restarts = CounterMetricFamily("oddaemon_job_restarts", "Restarts of the job's training after failures",
                                       labels=["job_name"])
        slurm = InfoMetricFamily("oddaemon_job_slurm", "The job's Slurm job by role (the Slurm backend): its "
                                 "Slurm job id, state and node list; after its end, the last one's",
                                 labels=["job_name", "role"])
        for v in snap["jobs"]:
            name = v["name"]
            for role, job in sorted((v.get("slurm") or {}).items()):
                slurm.add_metric([name, role], {"slurm_job_id": "" if job["job_id"] is None else str(job["job_id"]),
                                                "slurm_state": job["state"], "nodes": job["nodes"]})
            g["state"].add_metric([name, v["state"]], 1)
            restarts.add_metric([name], v["restarts"])
            g["gpus"].add_metric([name], len(v["gpus"]))
            if v["state"] == JobState.WAITING.value:
                g["after"].add_metric([name], len(v.get("waiting_for") or ()))
            if v.get("failure") and v["state"] in ("backoff", "failed"):
                g["failure"].add_metric([name, v["failure"]["kind"]], 1)
            live = JobState(v["state"]) not in TERMINAL  # a finished job has no speed and no ETA
            for key, field in (("step", "step"), ("target", "target_steps"), ("progress", "progress"),
                               ("rate", "steps_per_second"), ("eta", "eta_seconds"), ("lr", "learning_rate")):
                if v.get(field) is not None and (live or key not in ("rate", "eta")):
                    g[key].add_metric([name], v[field])
            for component, value in sorted(v["losses"].items()):
                g["loss"].add_metric([name, component], value)
            _evaluation(g, name, v["evaluation"])
        yield from g.values()
        yield restarts
        yield slurm

    @staticmethod
    def _sweeps(snap: Snapshot) -> Iterator[Metric]:
        value = GaugeMetricFamily("oddaemon_sweep_best_metric_value", "Best value of the [eval] metric among a "
                                  "sweep's variants, with the variant (job_name) that has it",
                                  labels=["sweep", "job_name", "metric"])
        step = GaugeMetricFamily("oddaemon_sweep_best_metric_step", "Step of the sweep's best checkpoint",
                                 labels=["sweep", "job_name"])
        for best in snap.get("sweeps", ()):
            value.add_metric([best["sweep"], best["job_name"], best["metric"]], best["value"])
            if best["step"] is not None:
                step.add_metric([best["sweep"], best["job_name"]], best["step"])
        yield value
        yield step


def _evaluation(g: dict, name: str, ev: dict) -> None:
    for state, n in ev["counts"].items():
        g["checkpoints"].add_metric([name, state], n)
    if ev["counts"]:
        g["pending"].add_metric([name], ev["counts"].get("pending", 0) + ev["counts"].get("running", 0))
    if ev.get("pins", {}).get("released"):
        g["released"].add_metric([name], ev["pins"]["released"])
    if ev.get("newest_completed_at") is not None:
        g["ckpt_time"].add_metric([name], ev["newest_completed_at"])
    latest = ev["latest"]
    if latest:
        if latest["step"] is not None:
            g["eval_step"].add_metric([name], latest["step"])
            g["ckpt_step"].add_metric([name],
                                      ev["newest_step"] if ev.get("newest_step") is not None else latest["step"])
        for metric, value in sorted(latest["metrics"].items()):
            g["eval_metric"].add_metric([name, metric], value)
        if latest["lag_seconds"] is not None:
            g["lag"].add_metric([name], latest["lag_seconds"])
        if latest["duration_seconds"] is not None:
            g["took"].add_metric([name], latest["duration_seconds"])
    best = ev["best"]
    if best and best["value"] is not None:
        g["best"].add_metric([name, ev["metric"]], best["value"])
        if best["step"] is not None:
            g["best_step"].add_metric([name], best["step"])


# (family key, name, help, usage key): one sample per live worker, labels job_name and role
_RESOURCES = (
    ("cpu", CounterMetricFamily, "oddaemon_job_cpu_seconds", "CPU time of the job's worker (its cgroup)",
     "cpu_seconds"),
    ("memory", GaugeMetricFamily, "oddaemon_job_memory_bytes", "Memory of the job's worker now (its cgroup)",
     "memory_bytes"),
    ("peak", GaugeMetricFamily, "oddaemon_job_memory_peak_bytes", "Highest memory of the job's worker so far",
     "memory_peak_bytes"),
    ("max", GaugeMetricFamily, "oddaemon_job_memory_max_bytes", "The worker's memory_max (absent: no limit)",
     "memory_max_bytes"),
    ("read", CounterMetricFamily, "oddaemon_job_io_read_bytes", "Bytes the job's worker read from block "
     "devices (cgroup v2)", "io_read_bytes"),
    ("written", CounterMetricFamily, "oddaemon_job_io_write_bytes", "Bytes the job's worker wrote to block "
     "devices (cgroup v2)", "io_write_bytes"),
    ("pressure", CounterMetricFamily, "oddaemon_job_memory_pressure_seconds", "Time some of the worker's "
     "threads stalled waiting for memory (PSI, cgroup v2)", "memory_pressure_seconds"),
)


def _resources(cgroups: dict) -> Iterator[Metric]:
    """Read at scrape time from the live workers' cgroup files (a group removed since: skipped)."""
    families = {key: kind(name, text, labels=["job_name", "role"]) for key, kind, name, text, _ in _RESOURCES}
    for name, role, group in cgroups["groups"]:
        usage = read_usage(group)
        for key, _, _, _, field in _RESOURCES if usage is not None else ():
            if usage.get(field) is not None:
                families[key].add_metric([name, role], usage[field])
    yield from families.values()
    backend = GaugeMetricFamily("oddaemon_cgroups", "1 for the per-job cgroup backend in use (v2, v1 or none)",
                                labels=["backend"])
    backend.add_metric([cgroups["backend"]], 1)
    yield backend
    own = read_usage(cgroups["daemon"]) if cgroups.get("daemon") is not None else None
    cpu = CounterMetricFamily("oddaemon_daemon_cpu_seconds", "CPU time of the daemon itself, its own cgroup "
                              "leaf apart from the jobs' (cgroup v2)")
    memory = GaugeMetricFamily("oddaemon_daemon_memory_bytes", "Memory of the daemon itself (its cgroup leaf, v2)")
    if own is not None and own.get("cpu_seconds") is not None:
        cpu.add_metric([], own["cpu_seconds"])
        memory.add_metric([], own["memory_bytes"])
    yield cpu
    yield memory


def serve(listen: tuple[str, int], collector: SnapshotCollector) -> object:
    """Start the HTTP endpoint in its own thread on a private registry. Returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    host, port = listen
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
