"""Daemon configuration: ``parse_config(text, path)`` and ``load_config(path)``.

Every problem in the file is reported at once in one ``ConfigError`` that names the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oddaemon.core import job_validation, notifications, resources
from oddaemon.core.checks import Invalid, finite_number, is_int, one_of, rule, show, whole_number
from oddaemon.core.errors import ConfigError, describe_cause
from oddaemon.core.model_dir_poll import effective_interval
from oddaemon.core.slurm import TIME_LIMIT_RE, SlurmSettings

DEFAULT_PORT = 9781
MAX_GPU_ID = 63
EVENT_LOOPS = ("auto", "glib", "select")
SLURM_MODEL_DIR_POLL_SECONDS = 2.0  # [cluster] model_dir_poll_seconds = "auto" with the Slurm backend


@dataclass(frozen=True)
class Config:
    path: str | None
    spool_dir: str = "/var/spool/oddaemon"
    state_dir: str = "/var/lib/oddaemon"
    log_dir: str = "/var/log/oddaemon"
    gpus: str | tuple[int, ...] = "auto"
    metrics_listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    metrics_max_finished_jobs: int = 20  # finished jobs still exported (bounded label cardinality)
    metrics_finished_max_age_seconds: float = 86400.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    max_restarts: int = 3
    backoff_base_seconds: float = 10.0
    backoff_cap_seconds: float = 600.0
    restart_reset_after_seconds: float = 1800.0
    hang_timeout_seconds: float = 1800.0  # a train worker silent this long is hung (0 = never)
    stop_grace_seconds: float = 30.0
    allowed_roots: tuple[str, ...] = ("/srv/oddaemon", "/var/lib/oddaemon/models")
    max_cpu_jobs: int = 1
    max_job_file_bytes: int = 1_048_576
    submit_group: str = "oddaemon-submit"
    worker_python: str = ""
    worker_module: str = "oddaemon.workers"
    worker_preflight: bool = True  # run `<module> preflight` on each job before it is queued
    worker_user: str = ""  # "" = workers run as the daemon's own user (see oddaemon/adapters/confine.py)
    worker_allow_root: bool = False  # a daemon running as root may run its workers as root
    event_loop: str = "auto"
    dbus_bus: str = "system"  # where the D-Bus API is published; "none" = control socket only
    pins_min_free_bytes: int = 5 * 1024**3  # keep this much free on a model_dir's file system ...
    pins_min_free_percent: float = 5.0  # ... or this share of it, whichever is larger
    pins_max_bytes_per_job: int = 0  # bytes only the pins of one job hold (0: no cap but the floor)
    eval_cpu_nice: int = 19  # a CPU evaluator's nice value (and its autogroup's): the trainer keeps its speed
    eval_cpu_threads: int = 0  # a CPU evaluator's TF/OpenMP thread limit (0: as TF picks, one per core)
    cluster_backend: str = "local"  # how train/export workers run: "local" processes or "slurm" batch jobs
    slurm_conf: str = ""  # SLURM_CONF for the Slurm tools ("" = their default)
    slurm_partition: str = ""
    slurm_eval_partition: str = ""
    slurm_account: str = ""
    slurm_qos: str = ""
    slurm_time_limit: str = ""
    slurm_gres: str = "gpu"
    slurm_extra_args: tuple[str, ...] = ()
    slurm_partitions: tuple[str, ...] = ()  # partitions a job may choose with its own [slurm] partition
    slurm_poll_seconds: float = 3.0
    slurm_max_nodes: int = 1  # the most nodes a job's [slurm] nodes may ask for (several: MultiWorkerMirroredStrategy)
    slurm_port_base: int = 8888  # the first TCP port the tasks of a several-node job listen on (SlurmClusterResolver)
    slurm_warning_seconds: int = 120  # Slurm's warning signal this long before a job's time limit
    model_dir_poll_seconds: float | None = None  # None = "auto": polled every 2 s with Slurm, not polled locally
    notify_targets: tuple[notifications.Target, ...] = ()  # [notify.targets.NAME] (core/notifications.py)
    notify_default_targets: tuple[str, ...] = ()
    notify_default_events: tuple[str, ...] = notifications.DEFAULT_EVENTS
    notify_timeout_seconds: float = 10.0
    notify_retries: int = 3
    notify_retry_backoff_seconds: float = 5.0
    notify_queue_size: int = 100
    notify_stalled_after_seconds: float = 900.0
    # [cgroups]: per-job cgroups and their limits (core/resources.py; None: no limit)
    cgroups_mode: str = "auto"
    cgroups_train_memory_max: int | None = None
    cgroups_eval_memory_max: int | None = None
    cgroups_train_cpu_weight: int = 100
    cgroups_eval_cpu_weight: int = 100
    cgroups_cpu_eval_cpu_weight: int = 20
    cgroups_memory_max_ceiling: int | None = None
    cgroups_cpu_weight_ceiling: int = resources.CPU_WEIGHT_MAX

    @property
    def cgroups(self) -> resources.Defaults:
        return resources.Defaults(**{f.name: getattr(self, f"cgroups_{f.name}")
                                     for f in dataclasses.fields(resources.Defaults)})

    def notify_settings(self) -> notifications.Settings:
        return notifications.Settings(self.notify_targets, self.notify_default_targets, self.notify_default_events,
                                      self.notify_timeout_seconds, self.notify_retries,
                                      self.notify_retry_backoff_seconds, self.notify_queue_size,
                                      self.notify_stalled_after_seconds)

    def validation_context(self) -> job_validation.ValidationContext:
        return job_validation.ValidationContext(allowed_roots=self.allowed_roots,
                                                max_file_bytes=self.max_job_file_bytes,
                                                slurm_partitions=self.slurm_partitions,
                                                slurm_max_nodes=self.slurm_max_nodes,
                                                notify_targets=tuple(t.name for t in self.notify_targets),
                                                resource_ceilings=(self.cgroups.memory_max_ceiling,
                                                                   self.cgroups.cpu_weight_ceiling))

    def slurm_settings(self) -> SlurmSettings:
        return SlurmSettings(self.slurm_partition, self.slurm_eval_partition, self.slurm_account, self.slurm_qos,
                             self.slurm_time_limit, self.slurm_gres, self.slurm_extra_args, self.slurm_poll_seconds,
                             warning_seconds=self.slurm_warning_seconds, port_base=self.slurm_port_base)

    def model_dir_poll_interval(self) -> float:
        """Seconds between two polls of an active job's model_dir (0: inotify only; core/model_dir_poll.py)."""
        return effective_interval(self.model_dir_poll_seconds, self.cluster_backend, SLURM_MODEL_DIR_POLL_SECONDS)

    def resolved_worker_python(self) -> str:
        """The interpreter for workers: the configured one (a bare name is looked up on PATH) or our own."""
        if not self.worker_python:
            return sys.executable
        if "/" in self.worker_python:
            return self.worker_python
        return shutil.which(self.worker_python) or self.worker_python

    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) to serve metrics on, or None when metrics are disabled."""
        return split_listen_address(self.metrics_listen) if self.metrics_listen else None


def split_listen_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[ipv6]:port``; raises ValueError with a reason a user can act on."""
    match = re.fullmatch(r"\[([^\]]*)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", text)
    if not match:
        raise ValueError(f"must be host:port or [ipv6-address]:port (e.g. 127.0.0.1:{DEFAULT_PORT}), "
                         f"or \"\" to disable metrics, got {show(text)}")
    host, port = (match.group(1), match.group(2)) if match.group(2) else (match.group(3), match.group(4))
    if match.group(2):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {int(port)} is out of range; it must be from 1 to 65535")
    return host, int(port)


def _listen(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string such as \"127.0.0.1:{DEFAULT_PORT}\", got {show(value)}")
    if value:
        try:
            split_listen_address(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    return value


_path = rule("a non-empty path string", lambda v: isinstance(v, str) and v != "" and "\0" not in v)
_group = rule("a group name, or \"\" to let anyone who can write to the spool submit",
              lambda v: isinstance(v, str) and v == v.strip() and "\0" not in v and ":" not in v)
_user = rule("a user name such as \"oddaemon\", or \"\" for the daemon's own user",
             lambda v: isinstance(v, str) and v == v.strip() and "\0" not in v and ":" not in v)
_boolean = rule("true or false", lambda v: isinstance(v, bool))
_module = rule("a dotted Python module name such as \"oddaemon.workers\"",
               lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", v, re.ASCII) is not None)
_python = rule("a string (\"\" means the daemon's own interpreter)", lambda v: isinstance(v, str) and "\0" not in v)


def _roots(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a non-empty list of directories, got {show(value)}")
    return tuple(_path(v) for v in value)


def _gpus(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str) and value in ("auto", "none"):
        return "auto" if value == "auto" else ()
    if not isinstance(value, list):
        raise Invalid(f"must be \"auto\", \"none\" or a list of GPU ids such as [0, 1], got {show(value)}")
    for i, gpu in enumerate(value):
        if not is_int(gpu) or not 0 <= gpu <= MAX_GPU_ID:
            raise Invalid(f"GPU ids must be whole numbers from 0 to {MAX_GPU_ID}, got {show(gpu)} in {show(value)}")
        if gpu in value[:i]:
            raise Invalid(f"GPU id {gpu} is listed twice")
    return tuple(value)


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"must be a list of target names, got {show(value)}")
    return tuple(value)


CLUSTER_BACKENDS = ("local", "slurm")
# sbatch options a site may add for every job ([slurm] extra_args): resources and placement, never
# what oddaemon decides itself (job name, output, signal, requeue, GRES, partition, account, time)
SBATCH_ALLOWED = ("--constraint=", "--exclusive", "--mem=", "--mem-per-cpu=", "--mem-per-gpu=", "--cpus-per-task=",
                  "--cpus-per-gpu=", "--reservation=", "--exclude=", "--nodelist=", "--comment=", "--mail-type=",
                  "--mail-user=", "--nice=", "--priority=", "--licenses=", "--tmp=", "--hint=", "--cluster-constraint=")
_slurm_word = rule("a Slurm name (letters, digits, '_', '-', '.', ','), or \"\" for Slurm's default",
                   lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.,-]{0,200}", v) is not None)
_slurm_time = rule('a Slurm time limit such as "90", "12:00:00" or "2-00:00:00", or "" for the partition\'s',
                   lambda v: isinstance(v, str) and (v == "" or TIME_LIMIT_RE.fullmatch(v) is not None))


def _slurm_partitions(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid(f"must be a list of partition names, got {show(value)}")
    return tuple(_slurm_word(v) for v in value)


def _poll_seconds(value: Any) -> float | None:
    if value == "auto":
        return None
    if (is_int(value) or isinstance(value, float)) and (value == 0 or 0.2 <= value < 1e308):
        return float(value)
    raise Invalid(f'must be "auto", 0 (no polling) or a number of seconds >= 0.2, got {show(value)}')


def _slurm_conf(value: Any) -> str:
    return "" if value == "" else _path(value)


def _sbatch_args(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"must be a list of sbatch options, got {show(value)}")
    for arg in value:
        if not any(arg == allowed or (allowed.endswith("=") and arg.startswith(allowed) and len(arg) > len(allowed))
                   for allowed in SBATCH_ALLOWED) or any(c in arg for c in "\n\0"):
            raise Invalid(f"{show(arg)} is not an allowed sbatch option (allowed: "
                          f"{', '.join(a + ('...' if a.endswith('=') else '') for a in SBATCH_ALLOWED)})")
    return tuple(value)


# section -> key in the file -> (Config field, checker)
SCHEMA: dict[str, dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "paths": {"spool_dir": ("spool_dir", _path), "state_dir": ("state_dir", _path), "log_dir": ("log_dir", _path)},
    "gpus": {"devices": ("gpus", _gpus)},
    "metrics": {"listen": ("metrics_listen", _listen),
                "max_finished_jobs": ("metrics_max_finished_jobs", whole_number(0, 10_000)),
                "finished_job_max_age_seconds": ("metrics_finished_max_age_seconds", finite_number(0, inclusive=True))},
    "logs": {"max_bytes": ("log_max_bytes", whole_number(4096)), "backups": ("log_backups", whole_number(0, 1000))},
    "restart": {
        "max_restarts": ("max_restarts", whole_number(0, 1000)),
        "backoff_base_seconds": ("backoff_base_seconds", finite_number(0, inclusive=False)),
        "backoff_cap_seconds": ("backoff_cap_seconds", finite_number(0, inclusive=False)),
        "reset_after_seconds": ("restart_reset_after_seconds", finite_number(0, inclusive=False)),
        "hang_timeout_seconds": ("hang_timeout_seconds", finite_number(0, inclusive=True)),
    },
    "jobs": {
        "allowed_roots": ("allowed_roots", _roots),
        "max_cpu_jobs": ("max_cpu_jobs", whole_number(1, 1024)),
        "stop_grace_seconds": ("stop_grace_seconds", finite_number(0, inclusive=True)),
        "max_file_bytes": ("max_job_file_bytes", whole_number(1024, 64 * 1024 * 1024)),
        "submit_group": ("submit_group", _group),
    },
    "worker": {"python": ("worker_python", _python), "module": ("worker_module", _module),
               "preflight": ("worker_preflight", _boolean), "user": ("worker_user", _user),
               "allow_root": ("worker_allow_root", _boolean)},
    "pins": {"min_free_bytes": ("pins_min_free_bytes", whole_number(0)),
             "min_free_percent": ("pins_min_free_percent", rule("a number from 0 to 100", lambda v: (
                 is_int(v) or isinstance(v, float)) and 0 <= v <= 100, float)),
             "max_bytes_per_job": ("pins_max_bytes_per_job", whole_number(0))},
    "eval": {"cpu_nice": ("eval_cpu_nice", whole_number(0, 19)),
             "cpu_threads": ("eval_cpu_threads", whole_number(0, 1024))},
    "cluster": {"backend": ("cluster_backend", one_of(CLUSTER_BACKENDS)),
                "model_dir_poll_seconds": ("model_dir_poll_seconds", _poll_seconds)},
    "slurm": {"conf": ("slurm_conf", _slurm_conf), "partition": ("slurm_partition", _slurm_word),
              "eval_partition": ("slurm_eval_partition", _slurm_word), "account": ("slurm_account", _slurm_word),
              "qos": ("slurm_qos", _slurm_word), "time_limit": ("slurm_time_limit", _slurm_time),
              "gres": ("slurm_gres", _slurm_word), "extra_args": ("slurm_extra_args", _sbatch_args),
              "partitions": ("slurm_partitions", _slurm_partitions),
              "poll_seconds": ("slurm_poll_seconds", finite_number(0.2, inclusive=True)),
              "max_nodes": ("slurm_max_nodes", whole_number(1, 4096)),
              "port_base": ("slurm_port_base", whole_number(1024, 65_000)),
              "warning_seconds": ("slurm_warning_seconds", whole_number(10, 86_400))},
    "notify": {"targets": ("notify_targets", notifications.check_targets),
               "default_targets": ("notify_default_targets", _names),
               "default_events": ("notify_default_events", notifications.check_event_list),
               "timeout_seconds": ("notify_timeout_seconds", finite_number(0, inclusive=False)),
               "retries": ("notify_retries", whole_number(0, 20)),
               "retry_backoff_seconds": ("notify_retry_backoff_seconds", finite_number(0, inclusive=False)),
               "queue_size": ("notify_queue_size", whole_number(1, 10_000)),
               "stalled_after_seconds": ("notify_stalled_after_seconds", finite_number(0, inclusive=False))},
    "cgroups": {key: (f"cgroups_{key}", check) for key, check in resources.config_checkers().items()},
    "daemon": {"event_loop": ("event_loop", one_of(EVENT_LOOPS)),
               "dbus": ("dbus_bus", rule('"system", "session", "none" or a D-Bus address such as "unix:path=/run/x"',
                                         lambda v: isinstance(v, str) and (v in ("system", "session", "none")
                                                                           or ":" in v)))},
}
# Fields holding paths that may be written relative to the config file's directory.
RELATIVE_PATH_FIELDS = ("spool_dir", "state_dir", "log_dir", "allowed_roots", "worker_python", "slurm_conf")


def load_config(path: str | None) -> Config:
    """Read and parse the config file at ``path``; None gives the built-in defaults."""
    if path is None:
        return Config(path=None)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the configuration file {path}: {describe_cause(exc)}"]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"{path} is not UTF-8 text (byte offset {exc.start})"]) from None
    return parse_config(text, path)


def parse_config(text: str, path: str) -> Config:
    """Parse config file text; raises ConfigError listing every problem, each naming ``path``."""
    try:
        doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError(path, [f"{path} is not valid TOML: {exc}"]) from None
    base = os.path.dirname(os.path.abspath(path))
    problems: list[str] = []
    values: dict[str, Any] = {}
    for section, table in doc.items():
        home = [name for name, keys in SCHEMA.items() if section in keys]
        if section not in SCHEMA and home and not isinstance(table, dict):
            problems.append(f"key {show(section)} at the top level of {path} belongs in the [{home[0]}] section")
        elif section not in SCHEMA:
            close = difflib.get_close_matches(section, SCHEMA, n=1)
            hint = f"; did you mean [{close[0]}]?" if close else "."
            problems.append(f"unknown section [{section}] in {path}{hint} "
                            f"Sections: {', '.join(f'[{s}]' for s in SCHEMA)}")
        elif not isinstance(table, dict):
            problems.append(f"[{section}] in {path} must be a table (a [{section}] section), got {show(table)}")
        else:
            values.update(_section(section, table, path, problems))
    for name in RELATIVE_PATH_FIELDS:
        if name in values:
            values[name] = _resolve(name, values[name], base)
    base_s = values.get("backoff_base_seconds", Config.backoff_base_seconds)
    cap_s = values.get("backoff_cap_seconds", Config.backoff_cap_seconds)
    if "notify_targets" in values:  # a relative url_file is relative to this file, as other paths are
        values["notify_targets"] = tuple(
            dataclasses.replace(t, url_file=os.path.normpath(os.path.join(base, t.url_file))) if t.url_file else t
            for t in values["notify_targets"])
    known = [t.name for t in values.get("notify_targets", ())]
    for name in values.get("notify_default_targets", ()):
        if name not in known and not any(p.startswith("[notify] targets ") for p in problems):
            problems.append(f"[notify] default_targets in {path}: {show(name)} is not a target; the targets are "
                            f"the [notify.targets.NAME] sections ({', '.join(known) or 'none are configured'})")
    limits = {k.removeprefix("cgroups_"): v for k, v in values.items() if k.startswith("cgroups_")}
    problems += [f"[cgroups] {key} in {path}: {why}"
                 for key, why in resources.defaults_problems(dataclasses.replace(resources.Defaults(), **limits))]
    if cap_s < base_s:
        problems.append(f"[restart] backoff_cap_seconds in {path}: {cap_s:g} is smaller than "
                        f"backoff_base_seconds {base_s:g}; the cap must be >= the base")
    if problems:
        raise ConfigError(path, problems)
    return Config(path=path, **values)


def _section(section: str, table: dict, path: str, problems: list[str]) -> dict[str, Any]:
    schema = SCHEMA[section]
    values = {}
    for key, value in table.items():
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            problems.append(f"unknown key {show(key)} in [{section}] of {path}{hint} "
                            f"Allowed keys: {', '.join(schema)}")
            continue
        field_name, check = schema[key]
        try:
            values[field_name] = check(value)
        except Invalid as exc:
            problems.append(f"[{section}] {key} in {path}: {exc}")
    return values


def _resolve(name: str, value: Any, base: str) -> Any:
    """Make paths relative to the config file's directory absolute (worker_python only when it has a '/')."""
    if name == "allowed_roots":
        return tuple(os.path.normpath(os.path.join(base, root)) for root in value)
    if (name == "worker_python" and "/" not in value) or (name == "slurm_conf" and not value):
        return value
    return os.path.normpath(os.path.join(base, value))

