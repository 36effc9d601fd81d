"""The Grafana dashboard of a gochat cluster, generated from the metric list.

    python -m gochat.observability.dashboard > deploy/grafana/gochat.json

The metric list is the table of docs/http-api.md (``GET /metrics``), which a test compares with
what a running server exports. Every family in it gets a panel, in a row by subsystem: counters
as per-second rates, gauges as values, histograms as quantiles. Above them, a hand-written
"Service level" row shows the SLOs of the alert rules (deploy/prometheus/rules/) and a
"Resilience" row the circuit breakers and degradation switches. The output is deterministic (a
test regenerates it and compares); docs/observability.md, "Dashboard", describes it.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MetricFamily", "dashboard", "main", "metric_families", "render"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"
_BEGIN, _END = "<!-- metrics:begin -->", "<!-- metrics:end -->"
_ROW = re.compile(r"^\| `(gochat_[a-z0-9_]+)(?:\{([a-z_,]+)\})?` \| (\w+) \| (.*?) \|$", re.M)

#: every panel's data source: the dashboard's ``datasource`` variable
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: the series of the chosen cluster (job) and nodes
SELECTOR = 'job="$job", instance=~"$instance"'
#: cluster-wide figures (the SLOs are the cluster's, not a node's)
JOB = 'job="$job"'
RATE = "$__rate_interval"

#: the objectives of deploy/prometheus/rules/gochat-alerts.yml
ERROR_BUDGET = 0.001  # 99.9 % of requests succeed
LATENCY_BUDGET = 0.01  # 99 % of SENDs acknowledged within LATENCY_BOUND seconds
LATENCY_BOUND = "0.1"
#: ERROR codes that count against the availability objective (500, 501, 503)
FAILURE_CODES = "500|501|503"

#: subsystem rows, by the first matching part of a metric's name (the rest: "Messaging and
#: connections")
_SECTIONS = (
    ("gochat_breaker_", "Resilience"),
    ("gochat_degrad", "Resilience"),
    ("gochat_http_", "HTTP API"),
    ("gochat_store_", "Store"),
    ("gochat_slow_quer", "Store"),
    ("gochat_event", "Event bus"),
    ("cache", "Caches"),
)
#: families with hand-written panels in the "Resilience" row (exported by gochat/resilience)
_HAND_WRITTEN = ("gochat_breaker_state", "gochat_breaker_rejected_total", "gochat_degraded")
_QUANTILES = (("p50", "0.5"), ("p99", "0.99"), ("p99.9", "0.999"))
_WIDTH, _HEIGHT = 8, 8


@dataclass(frozen=True)
class MetricFamily:
    """One row of the metric table: the family's name as scraped (counters with ``_total``),
    its labels, type and meaning."""

    name: str
    labels: tuple[str, ...]
    type: str
    help: str

    @property
    def section(self) -> str:
        return next((title for part, title in _SECTIONS if part in self.name), "Messaging and connections")


def metric_families(doc: Path = DOC) -> list[MetricFamily]:
    """The families docs/http-api.md lists, in its order (``_created`` series, added by
    prometheus_client to each labelled counter, left out)."""
    text = doc.read_text(encoding="utf-8")
    if text.count(_BEGIN) != 1 or text.count(_END) != 1:
        raise ValueError(f"{doc}: the metric table markers are missing")
    table = text[text.index(_BEGIN) : text.index(_END)]
    families = [
        MetricFamily(m[1], tuple(m[2].split(",")) if m[2] else (), m[3], _plain(m[4]))
        for m in _ROW.finditer(table)
        if not m[1].endswith("_created")
    ]
    if not families:
        raise ValueError(f"{doc}: no metric in the table")
    return families


def _plain(markdown: str) -> str:
    """A table cell as plain text: links by their text, no code marks."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    return text.replace("`", "").strip()


# ---- panels -------------------------------------------------------------------------------------


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True, "refId": ref}


def _timeseries(
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    unit: str,
    thresholds: tuple[float, ...] = (),
    mappings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": "red", "value": t} for t in thresholds]
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "mappings": mappings or [],
                "thresholds": {"mode": "absolute", "steps": steps},
                "custom": {"thresholdsStyle": {"mode": "line" if thresholds else "off"}},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def _stat(title: str, description: str, expr: str, unit: str, thresholds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(expr, title, "A")],
        "fieldConfig": {
            "defaults": {"unit": unit, "mappings": [], "thresholds": {"mode": "absolute", "steps": thresholds}},
            "overrides": [],
        },
        "options": {
            "colorMode": "value",
            "graphMode": "area",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
    }


def _legend(labels: tuple[str, ...]) -> str:
    return " ".join("{{" + label + "}}" for label in labels)


def _family_panel(f: MetricFamily) -> dict[str, Any]:
    """The generated panel of one family."""
    seconds, size = f.name.removesuffix("_total").endswith("_seconds"), "_bytes" in f.name
    if f.type == "counter":
        by = f.labels or ("instance",)
        expr = f"sum by ({', '.join(by)}) (rate({f.name}{{{SELECTOR}}}[{RATE}]))"
        unit = "s" if seconds else "Bps" if size else "ops"
        return _timeseries(f"{f.name} /s", f.help, [(expr, _legend(by))], unit)
    if f.type == "gauge":
        unit = "s" if seconds else "bytes" if size else "short"
        if "key" in f.labels:  # one series per key: the ten largest
            expr = f"topk(10, max by ({', '.join(f.labels)}) ({f.name}{{{SELECTOR}}}))"
            return _timeseries(f.name, f.help, [(expr, _legend(f.labels))], unit)
        if f.labels:
            expr = f"sum by ({', '.join(f.labels)}) ({f.name}{{{SELECTOR}}})"
            return _timeseries(f.name, f.help, [(expr, _legend(f.labels))], unit)
        return _timeseries(f.name, f.help, [(f"max by (instance) ({f.name}{{{SELECTOR}}})", "{{instance}}")], unit)
    if f.type == "histogram":
        keep = ", ".join(("le", *f.labels))
        targets = [
            (f"histogram_quantile({q}, sum by ({keep}) (rate({f.name}_bucket{{{SELECTOR}}}[{RATE}])))", name)
            for name, q in _QUANTILES
        ]
        return _timeseries(f.name, f.help, targets, "s" if seconds else "short")
    raise ValueError(f"{f.name}: no panel for metric type {f.type!r}")


def _failure_ratio(window: str) -> str:
    failures = f'sum(rate(gochat_errors_total{{{JOB}, code=~"{FAILURE_CODES}"}}[{window}]))'
    acked = f"sum(rate(gochat_send_latency_seconds_count{{{JOB}}}[{window}]))"
    return f"({failures} or vector(0)) / (({failures} or vector(0)) + {acked})"


def _fast_ratio(window: str) -> str:
    fast = f'sum(rate(gochat_send_latency_seconds_bucket{{{JOB}, le="{LATENCY_BOUND}"}}[{window}]))'
    return f"{fast} / sum(rate(gochat_send_latency_seconds_count{{{JOB}}}[{window}]))"


def _slow_ratio(window: str) -> str:
    return f"1 - {_fast_ratio(window)}"


def _red_below(good: float) -> list[dict[str, Any]]:
    return [{"color": "red", "value": None}, {"color": "green", "value": good}]


def _service_level() -> list[dict[str, Any]]:
    """The SLOs and the traffic against last week's (the anomaly rules' baseline)."""
    messages = f"sum(rate(gochat_messages_in_total{{{JOB}}}[1h]"
    return [
        _stat(
            "Nodes up",
            "Nodes whose /metrics Prometheus scraped at the last attempt (the up series of the job).",
            f"sum(up{{{JOB}}})",
            "short",
            _red_below(1),
        ),
        _stat(
            "Requests succeeded (1 h)",
            "Availability SLI: SENDs acknowledged over them plus ERRORs 500, 501 and 503 (objective 99.9 %).",
            f"1 - ({_failure_ratio('1h')})",
            "percentunit",
            _red_below(1 - ERROR_BUDGET),
        ),
        _stat(
            f"SENDs within {int(float(LATENCY_BOUND) * 1000)} ms (1 h)",
            f"Latency SLI: SENDs acknowledged within {LATENCY_BOUND} s (objective 99 %).",
            _fast_ratio("1h"),
            "percentunit",
            _red_below(1 - LATENCY_BUDGET),
        ),
        _timeseries(
            "Error budget burn rate",
            "Failure ratio over the budget (0.1 %). 1 spends the 30-day budget in 30 days; the page "
            "fires above 14.4 (1 h and 5 min windows) or 6 (6 h and 30 min).",
            [
                (f"({_failure_ratio('1h')}) / {ERROR_BUDGET}", "1 h"),
                (f"({_failure_ratio('6h')}) / {ERROR_BUDGET}", "6 h"),
            ],
            "short",
            (6, 14.4),
        ),
        _timeseries(
            "Latency budget burn rate",
            f"Share of SENDs slower than {LATENCY_BOUND} s over the budget (1 %); same thresholds.",
            [
                (f"({_slow_ratio('1h')}) / {LATENCY_BUDGET}", "1 h"),
                (f"({_slow_ratio('6h')}) / {LATENCY_BUDGET}", "6 h"),
            ],
            "short",
            (6, 14.4),
        ),
        _timeseries(
            "SENDs /s against last week",
            "Accepted SENDs of the cluster over the last hour and the same hour a week earlier: the "
            "message-rate anomaly alerts fire below half or above three times last week's.",
            [(f"{messages}))", "now"), (f"{messages} offset 1w))", "a week ago")],
            "ops",
        ),
    ]


def _resilience() -> list[dict[str, Any]]:
    states = ["closed", "open", "half-open", "forced open", "forced closed"]
    mappings = [{"type": "value", "options": {str(i): {"text": s, "index": i} for i, s in enumerate(states)}}]
    return [
        _timeseries(
            "Circuit breakers",
            "gochat_breaker_state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed.",
            [(f"max by (instance, breaker) (gochat_breaker_state{{{SELECTOR}}})", "{{instance}} {{breaker}}")],
            "short",
            (1,),
            mappings,
        ),
        _timeseries(
            "Calls refused by a breaker /s",
            "gochat_breaker_rejected_total: calls failed fast while a breaker was open.",
            [(f"sum by (breaker) (rate(gochat_breaker_rejected_total{{{SELECTOR}}}[{RATE}]))", "{{breaker}}")],
            "ops",
        ),
        _timeseries(
            "Degradation switches",
            "gochat_degraded: 1 while a switch (read_only, cache_only, non_core_off) is on.",
            [(f"max by (instance, switch) (gochat_degraded{{{SELECTOR}}})", "{{instance}} {{switch}}")],
            "short",
            (1,),
        ),
    ]


def _layout(rows: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Rows of panels, three to a line, with ids and grid positions."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row_panels in rows:
        panels.append(
            {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        )
        y += 1
        for i, panel in enumerate(row_panels):
            panel["gridPos"] = {"h": _HEIGHT, "w": _WIDTH, "x": (i % 3) * _WIDTH, "y": y + (i // 3) * _HEIGHT}
            panels.append(panel)
        y += -(-len(row_panels) // 3) * _HEIGHT
    for n, panel in enumerate(panels, 1):
        panel["id"] = n
    return panels


def _variable(name: str, label: str, query: str, *, all_nodes: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-query"},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "multi": all_nodes,
        "includeAll": all_nodes,
        "allValue": ".*" if all_nodes else None,
        "current": {},
        "options": [],
    }


def dashboard(families: list[MetricFamily]) -> dict[str, Any]:
    """The dashboard's JSON model (Grafana 10, schema 39)."""
    sections: dict[str, list[dict[str, Any]]] = {}
    for f in families:
        if f.name not in _HAND_WRITTEN:
            sections.setdefault(f.section, []).append(_family_panel(f))
    resilience = _resilience() + sections.pop("Resilience", [])
    rows = [("Service level", _service_level()), *sections.items(), ("Resilience", resilience)]
    return {
        "uid": "gochat",
        "title": "gochat",
        "description": "gochat cluster: SLOs, traffic, data plane, store, event bus, caches (generated by "
        "python -m gochat.observability.dashboard)",
        "tags": ["gochat"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "options": [],
                },
                _variable("job", "Cluster (job)", "label_values(gochat_connections, job)"),
                _variable("instance", "Node", 'label_values(gochat_connections{job="$job"}, instance)', all_nodes=True),
            ]
        },
        "panels": _layout(rows),
    }


def render(families: list[MetricFamily] | None = None) -> str:
    """The dashboard as the JSON text committed in deploy/grafana/gochat.json."""
    model = dashboard(metric_families() if families is None else families)
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
