"""Helpers for the metrics tests: a free loopback port, a real Prometheus server process, its HTTP API,
and the PromQL expressions of the shipped Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(REPO, "etc", "grafana", "oddaemon-dashboard.json")
PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)

# What Grafana would put in place of its variables when the panel is rendered (All jobs, a short step).
SUBSTITUTIONS = {"job_name": ".*", "__rate_interval": "5s", "__interval": "5s", "__range": "5m"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice; closed again at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10, headers: dict | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as reply:
        return reply.read()


# ---------------------------------------------------------------------------------------- dashboard


def load_dashboard(path: str = DASHBOARD) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query of every panel."""
    return [(p, t) for p in all_panels(dashboard) for t in p.get("targets", [])]


def substitute(expr: str, values: dict[str, str] = SUBSTITUTIONS) -> str:
    """Replace Grafana's ``$name`` / ``${name}`` / ``[[name]]`` variables; an unknown one is an error."""
    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no test value (in {expr!r})")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


def dashboard_expressions(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with the variables substituted) for every target, in order."""
    dashboard = dashboard or load_dashboard()
    return [(f"{p['title']} / {t['refId']}", substitute(t["expr"])) for p, t in dashboard_targets(dashboard)]


# ---------------------------------------------------------------------------------------- Prometheus


class Prometheus:
    """A real Prometheus server on a free loopback port, scraping ``targets`` every ``interval``.
    ``stop()`` always ends it (SIGTERM, then SIGKILL); use as a context manager or call stop()."""

    def __init__(self, root: str, targets: list[str], interval: str = "1s", job: str = "oddaemon"):
        if PROMETHEUS is None:
            raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = os.path.join(root, "prometheus.yml")
        self.log_path = os.path.join(root, "prometheus.log")
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval,
                             "scrape_timeout": interval},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}]}
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=2)  # JSON is YAML
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Prometheus:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={os.path.join(self.root, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--web.enable-lifecycle", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if http_get(f"{self.url}/-/ready", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-10000:]
        except OSError:
            return ""

    # ---- HTTP API
    def api(self, path: str, **params) -> dict | list:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            body = http_get(url)
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error in the JSON body
            body = exc.read()
        reply = json.loads(body)
        if reply.get("status") != "success":
            raise AssertionError(f"{path} {params}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query: the result list (vector or scalar/string wrapped in one element)."""
        data = self.api("query", query=expr, **({"time": repr(at)} if at is not None else {}))
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=repr(start), end=repr(end), step=repr(step))["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        """The single value of ``expr``; fails unless exactly one series answers."""
        result = self.query(expr, at)
        if len(result) != 1:
            raise AssertionError(f"{expr}: expected one series, got {result}")
        return float(result[0]["value"][1])

    def values(self, expr: str, label: str, at: float | None = None) -> dict[str, float]:
        """{value of ``label``: value} over the series of ``expr``."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr, at)}

    def targets_up(self) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)
