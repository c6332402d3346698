#!/usr/bin/env python3
"""Render a picture of the Grafana dashboard without Grafana (not a test; needs matplotlib).

Grafana is not packaged in Debian 12, so this draws each panel of etc/grafana/oddaemon-dashboard.json
with matplotlib from the panel's own queries, answered by a real Prometheus that scrapes a real daemon
running stand-in jobs (the scenario of test_prometheus_live.py, stretched to a few minutes). Layout
(gridPos), titles, legends (legendFormat), units, min/max, thresholds and the table transformations
used by the dashboard (merge, groupBy, organize) are honoured; styling is only Grafana-like.
    .venv/bin/python -m tests.metrics.render_dashboard [--out etc/grafana/oddaemon-dashboard-preview.png]
        [--minutes 3]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import time

from tests.support.harness import DaemonEnv, wait_for
from tests.support.prom import REPO, Prometheus, all_panels, free_port, load_dashboard, substitute

BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLORS = {"green": "#73bf69", "red": "#f2495c", "yellow": "#fade2a", "orange": "#ff9830", "blue": "#5794f2",
          "purple": "#b877d9", "super-light-blue": "#8ab8ff", "text": "#ccccdc"}
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d",
           "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477"]


# ------------------------------------------------------------------------------------ scenario


def run_scenario(env: DaemonEnv, prom: Prometheus, minutes: float) -> tuple[float, float]:
    env.start()
    prom.start()
    wait_for(prom.targets_up, 30, 0.2, what="Prometheus to scrape the daemon")
    start = time.time()
    seconds = minutes * 60
    # two GPUs: a short job, then a long one on each; a job queued behind them; a CPU job that crashes
    env.drop("ssd_mobilenet_v2.toml", env.job_text("ssd_mobilenet_v2", num_steps=int(seconds * 0.35 / 0.1), every=100,
                                                   keep=5, priority=10, step_seconds=0.1, eval_seconds=4.0))
    env.drop("effdet_d0.toml", env.job_text("effdet_d0", num_steps=100_000, every=150, keep=5, priority=9,
                                            step_seconds=0.15, eval_seconds=3.0))
    time.sleep(2)
    env.drop("effdet_d1.toml", env.job_text("effdet_d1", num_steps=100_000, every=100, keep=5, priority=5,
                                            step_seconds=0.2, eval_seconds=3.0, map_peak_step=600))
    env.drop("faster_rcnn.toml", env.job_text("faster_rcnn", num_steps=100_000, priority=0))
    time.sleep(seconds * 0.3)
    env.drop("centernet_cpu.toml", env.job_text("centernet_cpu", num_steps=500, gpus=0, step_seconds=0.1,
                                                crash_at_step=40))
    env.drop("typo.toml", 'name = "typo"\npipeline_config = "relative/p.config"\n[pipeline]\nnum_clases = 3\n')
    remaining = start + seconds - time.time()
    time.sleep(max(0.0, remaining))
    return start, time.time()


# ------------------------------------------------------------------------------------ formatting


def legend(fmt: str, labels: dict) -> str:
    if not fmt or fmt == "__auto":
        inner = ", ".join(f'{k}="{v}"' for k, v in labels.items() if k not in ("__name__", "instance", "job"))
        return labels.get("__name__", "") + (f"{{{inner}}}" if inner else "") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def fmt_value(value: float | None, unit: str = "none", decimals: int | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "s":
        v = abs(value)
        if v >= 86400:
            return f"{value / 86400:.1f} day"
        if v >= 3600:
            return f"{value / 3600:.1f} hour"
        if v >= 60:
            return f"{value / 60:.1f} min"
        return f"{value:.{2 if decimals is None else decimals}f} s"
    if unit == "sci":
        return f"{value:.2e}"
    suffix = unit.split(":", 1)[1] if unit.startswith("suffix:") else ""
    if decimals is None:
        decimals = 0 if float(value).is_integer() else 3
    return f"{value:.{decimals}f}{suffix}"


def threshold_color(value: float | None, thresholds: dict) -> str:
    color = "green"
    for step in thresholds.get("steps", []):
        if step["value"] is None or (value is not None and value >= step["value"]):
            color = step["color"]
    return COLORS.get(color, color)


def override_color(name: str, overrides: list[dict]) -> str | None:
    for o in overrides:
        m = o["matcher"]
        hit = name == m["options"] if m["id"] == "byName" else bool(re.fullmatch(m["options"], name))
        if hit:
            for prop in o["properties"]:
                if prop["id"] == "color" and prop["value"].get("fixedColor"):
                    return COLORS.get(prop["value"]["fixedColor"], prop["value"]["fixedColor"])
    return None


# ------------------------------------------------------------------------------------ panels


class Renderer:
    def __init__(self, prom: Prometheus, start: float, end: float):
        self.prom, self.start, self.end = prom, start, end
        self.step = max(1.0, (end - start) / 300)

    def instant(self, target: dict) -> list[dict]:
        return self.prom.query(substitute(target["expr"]), self.end)

    def range(self, target: dict) -> list[dict]:
        return self.prom.query_range(substitute(target["expr"]), self.start, self.end, self.step)

    def draw(self, fig, panel: dict, rect) -> None:
        if panel["type"] == "row":
            ax = fig.add_axes(rect)
            ax.axis("off")
            ax.text(0, 0.3, panel["title"], color=TEXT, fontsize=12, fontweight="bold", va="center")
            return
        ax = fig.add_axes(rect)
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_color(GRID)
        ax.set_title(panel["title"], color=TEXT, fontsize=9, loc="left", pad=4)
        getattr(self, panel["type"])(ax, panel)

    def timeseries(self, ax, panel: dict) -> None:
        d = panel["fieldConfig"]["defaults"]
        unit, overrides = d.get("unit", "none"), panel["fieldConfig"]["overrides"]
        stacked = d.get("custom", {}).get("stacking", {}).get("mode") == "normal"
        step_style = d.get("custom", {}).get("lineInterpolation") == "stepAfter"
        bars = d.get("custom", {}).get("drawStyle") == "bars"
        series = []
        for t in panel["targets"]:
            for r in self.range(t):
                xs = [(float(x) - self.end) / 60 for x, _ in r["values"]]
                ys = [float(y) for _, y in r["values"]]
                series.append((legend(t.get("legendFormat", ""), r["metric"]), xs, ys))
        unstacked = {"GPUs", "queued jobs"}
        base: dict[float, float] = {}
        for i, (name, xs, ys) in enumerate(series):
            color = override_color(name, overrides) or PALETTE[i % len(PALETTE)]
            if stacked and name not in unstacked:
                lows = [base.get(x, 0.0) for x in xs]
                highs = [lo + y for lo, y in zip(lows, ys)]
                base.update(zip(xs, highs))
                ax.fill_between(xs, lows, highs, step="post" if step_style else None, color=color, alpha=0.6,
                                label=name, linewidth=0)
            elif bars:
                ax.bar(xs, ys, width=self.step / 60, color=color, label=name)
            else:
                ax.plot(xs, ys, color=color, label=name, linewidth=1.4, drawstyle="steps-post" if step_style else "default",
                        linestyle="--" if name.endswith((" target", " duration", "GPUs")) else "-")
        if "min" in d:
            ax.set_ylim(bottom=d["min"])
        if "max" in d:
            ax.set_ylim(top=d["max"])
        ax.set_xlim((self.start - self.end) / 60, 0)
        ax.tick_params(colors=TEXT, labelsize=6)
        ax.grid(color=GRID, linewidth=0.5)
        ax.set_xlabel("minutes ago", color=TEXT, fontsize=6, labelpad=1)
        ax.yaxis.set_major_formatter(lambda v, _: fmt_value(v, unit, d.get("decimals")))
        if series:
            ax.legend(fontsize=5.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, labelcolor=TEXT,
                      handlelength=1.2)
        else:
            ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)

    def _items(self, panel: dict) -> list[tuple[str, float]]:
        items = []
        for t in panel["targets"]:
            for r in self.instant(t):
                items.append((legend(t.get("legendFormat", ""), r["metric"]), float(r["value"][1])))
        return items

    def stat(self, ax, panel: dict) -> None:
        from matplotlib.patches import Rectangle  # noqa: PLC0415

        d = panel["fieldConfig"]["defaults"]
        items = self._items(panel)
        ax.set_xticks([])
        ax.set_yticks([])
        n = max(1, len(items))
        for i, (name, value) in enumerate(items):
            color = threshold_color(value, d["thresholds"])
            x0, w = i / n, 1 / n
            if panel["options"].get("colorMode") == "background":
                ax.add_patch(Rectangle((x0 + 0.01, 0.04), w - 0.02, 0.9, color=color, transform=ax.transAxes,
                                       alpha=0.85))
                fg = "#111217"
            else:
                fg = color
            size = 16 if n <= 2 else 11 if n <= 4 else 8
            ax.text(x0 + w / 2, 0.5, fmt_value(value, d.get("unit", "none"), d.get("decimals")), color=fg,
                    fontsize=size, ha="center", va="center", fontweight="bold", transform=ax.transAxes)
            ax.text(x0 + w / 2, 0.15, name, color=fg, fontsize=6, ha="center", va="center", transform=ax.transAxes)

    def bargauge(self, ax, panel: dict) -> None:
        d = panel["fieldConfig"]["defaults"]
        items = sorted(self._items(panel), key=lambda item: item[0])
        ax.set_yticks([])
        ax.set_xticks([])
        if not items:
            ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)
            return
        top = d.get("max", max(v for _, v in items) or 1)
        lo = d.get("min", 0)
        for i, (name, value) in enumerate(items):
            y = len(items) - 1 - i
            color = override_color(name, panel["fieldConfig"]["overrides"]) or threshold_color(value, d["thresholds"])
            ax.barh(y, top - lo, left=lo, color=GRID, height=0.7)
            ax.barh(y, max(0.0, min(value, top) - lo), left=lo, color=color, height=0.7)
            ax.text(lo, y, f" {name}", color=TEXT, fontsize=6, va="center", ha="left")
            ax.text(top, y, fmt_value(value, d.get("unit", "none"), d.get("decimals")) + " ", color=TEXT, fontsize=6,
                    va="center", ha="right", fontweight="bold")
        ax.set_xlim(lo, top)
        ax.set_ylim(-0.6, len(items) - 0.4)

    def table(self, ax, panel: dict) -> None:
        rows: list[dict] = []
        multi = len(panel["targets"]) > 1
        for t in panel["targets"]:
            column = f"Value #{t['refId']}" if multi else "Value"
            results = self.instant(t) if t.get("instant") else self.range(t)
            for r in results:
                points = [r["value"]] if "value" in r else r["values"]
                for when, value in points:
                    rows.append({"Time": float(when), **r["metric"], column: float(value)})
        for tr in panel.get("transformations", []):
            rows = getattr(self, "_" + tr["id"])(rows, tr["options"])
        ax.axis("off")
        if not rows:
            ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        units = {}
        for o in panel["fieldConfig"]["overrides"]:
            for c in columns:
                m = o["matcher"]
                if (m["id"] == "byName" and c == m["options"]) or (m["id"] == "byRegexp" and re.fullmatch(m["options"], c)):
                    for prop in o["properties"]:
                        if prop["id"] in ("unit", "decimals"):
                            units.setdefault(c, {})[prop["id"]] = prop["value"]
        sort = panel["options"].get("sortBy") or []
        if sort and sort[0]["displayName"] in columns:
            key = sort[0]["displayName"]
            rows.sort(key=lambda r: (r.get(key) is None, r.get(key)), reverse=sort[0]["desc"])
        cells = [[fmt_value(r[c], units.get(c, {}).get("unit", "none"), units.get(c, {}).get("decimals"))
                  if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows[:14]]
        tbl = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="left", colLoc="left")
        tbl.auto_set_font_size(False)
        tbl.set_fontsize(6)
        for (i, _), cell in tbl.get_celld().items():
            cell.set_facecolor(PANEL if i else GRID)
            cell.set_edgecolor(GRID)
            cell.get_text().set_color(TEXT)
            cell.set_height(0.085)

    # table transformations, as Grafana does them (for the options this dashboard uses)
    @staticmethod
    def _merge(rows: list[dict], options: dict) -> list[dict]:
        value_cols = {k for r in rows for k in r if k.startswith("Value")}
        keys = set.intersection(*[set(r) - value_cols for r in rows]) if rows else set()
        merged: dict[tuple, dict] = {}
        for r in rows:
            key = tuple(sorted((k, r[k]) for k in keys))
            merged.setdefault(key, {}).update(r)
        return list(merged.values())

    @staticmethod
    def _groupBy(rows: list[dict], options: dict) -> list[dict]:
        fields = options["fields"]
        by = [f for f, o in fields.items() if o["operation"] == "groupby"]
        groups: dict[tuple, dict] = {}
        for r in sorted(rows, key=lambda r: r.get("Time", 0)):
            key = tuple(r.get(f) for f in by)
            if None in key:
                continue
            g = groups.setdefault(key, dict(zip(by, key)))
            for f, o in fields.items():
                if o["operation"] == "aggregate" and r.get(f) is not None:
                    for agg in o["aggregations"]:
                        g[f"{f} ({agg})"] = r[f]
        return list(groups.values())

    @staticmethod
    def _organize(rows: list[dict], options: dict) -> list[dict]:
        excluded = {k for k, v in options.get("excludeByName", {}).items() if v}
        order = options.get("indexByName", {})
        rename = options.get("renameByName", {})
        out = []
        for r in rows:
            keys = sorted((k for k in r if k not in excluded), key=lambda k: order.get(k, 100))
            out.append({rename.get(k, k): r[k] for k in keys if k not in ("__name__", "instance", "job", "Time")
                        or k in rename})
        return out


def render(prom: Prometheus, start: float, end: float, out: str) -> None:
    import matplotlib  # noqa: PLC0415 - optional dependency, only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after matplotlib.use("Agg")

    dashboard = load_dashboard()
    panels = all_panels(dashboard)
    height_units = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_in = 0.32
    fig = plt.figure(figsize=(24 * 0.8, height_units * unit_in + 0.6), facecolor=BG)
    fig.text(0.01, 1 - 0.25 / (height_units * unit_in + 0.6), f"{dashboard['title']}   ·   Job: All   ·   "
             f"last {round((end - start) / 60)} minutes   (matplotlib rendering of the dashboard's queries; not Grafana)",
             color=TEXT, fontsize=11, va="center")
    top = 1 - 0.6 / (height_units * unit_in + 0.6)
    renderer = Renderer(prom, start, end)
    for p in panels:
        g = p["gridPos"]
        x0, w = g["x"] / 24, g["w"] / 24
        h = g["h"] / height_units * top
        y0 = top - (g["y"] + g["h"]) / height_units * top
        pad_x, pad_top, pad_bottom = 0.006, 0.28 / (height_units * unit_in), 0.12 / (height_units * unit_in)
        if p["type"] == "row":
            renderer.draw(fig, p, [x0 + pad_x, y0, w - 2 * pad_x, h])
            continue
        right = 0.1 * w if p["type"] == "timeseries" else 0.0  # room for the legend
        if p["type"] == "timeseries":
            pad_bottom += 0.18 / (height_units * unit_in)
            x_left = 0.035 * w
        else:
            x_left = 0.0
        renderer.draw(fig, p, [x0 + pad_x + x_left, y0 + pad_bottom, w - 2 * pad_x - x_left - right * 1.6,
                               h - pad_top - pad_bottom])
    fig.savefig(out, dpi=80, facecolor=BG)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "etc", "grafana", "oddaemon-dashboard-preview.png"))
    ap.add_argument("--minutes", type=float, default=3.0)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="oddaemon-render-")
    port = free_port()
    env = DaemonEnv(os.path.join(root, "daemon"), config_overrides={
        "gpus": [0, 1], "metrics_listen": f"127.0.0.1:{port}", "max_restarts": 2, "backoff_base": 3.0,
        "backoff_cap": 6.0})
    prom = Prometheus(os.path.join(root, "prometheus"), [f"127.0.0.1:{port}"], interval="1s")
    try:
        start, end = run_scenario(env, prom, args.minutes)
        render(prom, start, end, args.out)
    finally:
        try:
            env.close()
        finally:
            prom.stop()
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
