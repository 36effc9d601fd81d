"""The monitoring shipped in deploy/ (docs/observability.md): Prometheus rules checked and unit
tested with promtool, the Alertmanager configuration checked with amtool and run for real
(routing, inhibition, silences, the webhook), and the Grafana dashboard regenerated and compared,
with every query's metric names checked against what a running server exports.

promtool and amtool are required (Debian: ``apt-get install prometheus
prometheus-alertmanager``; scripts/test.sh installs them): these tests fail without them.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gochat.observability import dashboard
from tests.conftest import GochatProcess, create_user, run

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "gochat.json"
OBSERVABILITY_MD = ROOT / "docs" / "observability.md"

#: Metrics the rules and the dashboard may use before gochat exports them (none now: keep it
#: empty unless a rule is written ahead of the code that exports its metric)
PENDING_METRICS: set[str] = set()
#: Series Prometheus itself writes for every scrape target, not gochat.
SCRAPE_METRICS = {"up"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install prometheus prometheus-alertmanager (scripts/test.sh does)"
    return path


def _check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}"
    return r


# ---- reading the rule files (YAML, without a YAML library: the files keep one layout) ------------


def _exprs(text: str) -> list[str]:
    """Every ``expr:`` of a rule file, single-line or block scalar (``expr: |``)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m[1]), m[2].strip()
        if value in ("|", "|-", ">", ">-"):
            block = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt.strip())
            value = " ".join(b for b in block if b)
        elif value[:1] in "'\"":
            value = value[1:-1]
        out.append(value)
    return out


def _alerts() -> list[dict[str, str]]:
    """Each alert rule: name, severity, runbook annotation."""
    found = []
    for path in RULES:
        blocks = re.split(r"^\s*- (?=alert:|record:)", path.read_text(encoding="utf-8"), flags=re.M)
        for block in blocks:
            m = re.match(r"alert:\s*(\w+)", block)
            if m:
                severity = re.search(r"^\s+severity:\s*(\w+)", block, re.M)
                runbook = re.search(r'^\s+runbook:\s*"([^"]+)"', block, re.M)
                found.append(
                    {
                        "name": m[1],
                        "severity": severity[1] if severity else "",
                        "runbook": runbook[1] if runbook else "",
                    }
                )
    return found


def _recorded() -> set[str]:
    return {m[1] for path in RULES for m in re.finditer(r"^\s*- record:\s*(\S+)", path.read_text(encoding="utf-8"), re.M)}


# ---- PromQL metric names ---------------------------------------------------------------------------

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_PROMQL_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label matchers,
    ranges, grouping labels and numbers left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if not m[2] and m[1].lower() not in _PROMQL_KEYWORDS:
            names.add(m[1])
    return names


def test_the_promql_name_reader_finds_names_and_only_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{le="0.1", x=~"a|b"}[5m] offset 1w))) > 0.25 '
        "and on (job) sum without (instance) (b_total) / ignoring (code) group_left (k) c:rec:ratio > bool 1 "
        "or absent(up{job=\"gochat\"} == 1) unless vector(0) * topk(10, d{e=\"$job\"}[$__rate_interval:1m])"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c:rec:ratio", "up", "d"}


# ---- exported metrics: a real server after a little traffic ----------------------------------------


@pytest.fixture(scope="module")
def exported(shared_server: GochatProcess) -> set[str]:
    """The sample names /metrics of a running ``gochat serve`` exposes (with _total, _bucket,
    _sum, _count as scraped), after HTTP requests, a SEND and an ERROR."""
    import aiohttp

    from gochat.protocol import Kind
    from gochat.protocol.frames import AuthOk, Deliver, Error, Send, SendAck
    from tests.e2e.rawclient import connect, send_frame

    async def traffic() -> str:
        alice = await create_user(shared_server.http_url, "mona")
        bob = await create_user(shared_server.http_url, "mobo")
        a, b = await connect(shared_server.ws_url, alice.access_token), await connect(shared_server.ws_url, bob.access_token)
        await a.expect(AuthOk)
        await b.expect(AuthOk)
        a.send(send_frame(Kind.DIRECT, bob.user_id, b"metrics", rid=2))
        await a.expect(SendAck)
        await b.expect(Deliver)
        anon = await connect(shared_server.ws_url)  # 108 NOT_AUTHENTICATED: gochat_errors_total{code}
        anon.send(Send(1, 1, 2, b"\0" * 16, b"x", rid=5))
        await anon.expect(Error)
        for c in (a, b, anon):
            c.close()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{shared_server.http_url}/metrics") as r:
                assert r.status == 200
                return await r.text()

    text = run(traffic())
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"} if kind == "histogram" else {family}
    assert {"gochat_send_latency_seconds_bucket", "gochat_messages_in_total", "gochat_errors_total"} <= names
    return names


# ---- Prometheus rules ------------------------------------------------------------------------------


def test_rules_and_the_example_configuration_pass_promtool_check() -> None:
    promtool = _tool("promtool")
    r = _check(promtool, "check", "rules", *map(str, RULES))
    assert r.stdout.count("SUCCESS") == len(RULES)
    _check(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))


def test_rule_unit_tests_pass_under_promtool() -> None:
    """deploy/prometheus/tests/*.yml: recorded series that reproduce each failure (and the
    cases that must stay quiet); one promtool per file, in parallel."""
    promtool = _tool("promtool")
    assert RULE_TESTS
    with ThreadPoolExecutor(len(RULE_TESTS)) as pool:
        results = list(
            pool.map(
                lambda p: subprocess.run(
                    [promtool, "test", "rules", str(p)], cwd=ROOT, capture_output=True, text=True, timeout=120
                ),
                RULE_TESTS,
            )
        )
    failed = [f"{p.name}:\n{r.stdout}{r.stderr}" for p, r in zip(RULE_TESTS, results, strict=True) if r.returncode]
    assert not failed, "\n".join(failed)


def test_every_alert_fires_in_a_test_and_stays_quiet_in_another() -> None:
    cases = "\n".join(p.read_text(encoding="utf-8") for p in RULE_TESTS)
    firing, quiet = set(), set()
    for m in re.finditer(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", cases):
        (quiet if m[2] else firing).add(m[1])
    names = {a["name"] for a in _alerts()}
    assert names, "no alert rule found"
    assert names - firing == set(), "alerts without a firing case"
    assert names - quiet == set(), "alerts without a case that stays quiet"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_every_alert_has_a_severity_and_a_runbook_in_the_docs() -> None:
    doc = OBSERVABILITY_MD.read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    for alert in _alerts():
        assert alert["severity"] in ("critical", "warning"), alert
        path, _, anchor = alert["runbook"].partition("#")
        assert path == "docs/observability.md" and anchor == alert["name"].lower(), alert
        assert anchor in anchors, f"docs/observability.md has no section {alert['name']}"


def test_rules_name_only_exported_metrics(exported: set[str]) -> None:
    exprs = [e for path in RULES for e in _exprs(path.read_text(encoding="utf-8"))]
    rules = sum(len(re.findall(r"^\s*- (?:alert|record):", p.read_text(encoding="utf-8"), re.M)) for p in RULES)
    assert len(exprs) == rules
    known = exported | PENDING_METRICS | SCRAPE_METRICS | _recorded()
    unknown = {name: e for e in exprs for name in promql_metric_names(e) if name not in known}
    assert not unknown, unknown


# ---- Alertmanager ------------------------------------------------------------------------------------


def test_alertmanager_configuration_passes_amtool() -> None:
    r = _check(_tool("amtool"), "check-config", str(ALERTMANAGER_YML))
    assert "SUCCESS" in r.stdout
    inhibit = re.search(r"(\d+) inhibit rules", r.stdout)
    assert inhibit and int(inhibit[1]) >= 3, r.stdout
    assert re.search(r"(\d+) receivers", r.stdout), r.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=GochatServiceDown", "severity=critical", "job=gochat"], "oncall-webhook"),
        (["alertname=GochatPostgresBreakerOpen", "severity=critical", "instance=a:8701"], "oncall-webhook"),
        (["alertname=GochatErrorBudgetBurn", "severity=critical", "slo=availability"], "oncall-webhook"),
        (["alertname=GochatErrorBudgetBurn", "severity=warning", "slo=availability"], "email-tickets"),
        (["alertname=GochatNodeDown", "severity=warning", "instance=b:8701"], "email-tickets"),
        (["alertname=SomethingElse"], "email-tickets"),
    ],
)
def test_routing_pages_critical_alerts_and_mails_warnings(labels: list[str], receiver: str) -> None:
    r = _check(
        _tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}",
        f"--verify.receivers={receiver}", *labels,
    )  # fmt: skip
    assert r.stdout.strip() == receiver


def test_notification_templates_render(tmp_path: Path) -> None:
    now = "2024-05-01T10:00:00Z"
    alert = {
        "status": "firing",
        "labels": {"alertname": "GochatNodeDown", "severity": "warning", "job": "gochat", "instance": "b:8701"},
        "annotations": {
            "summary": "gochat node b:8701 is down",
            "description": "b:8701 has failed its scrapes for 2 minutes.",
            "runbook": "docs/observability.md#gochatnodedown",
        },
        "startsAt": now,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": "1",
    }
    data = {
        "receiver": "email-tickets",
        "status": "firing",
        "alerts": [alert],
        "groupLabels": {"alertname": "GochatNodeDown", "job": "gochat"},
        "commonLabels": alert["labels"],
        "commonAnnotations": alert["annotations"],
        "externalURL": "http://alertmanager:9093",
    }
    (tmp_path / "data.json").write_text(json.dumps(data))
    rendered = {}
    for name in ("gochat.email.subject", "gochat.email.text", "gochat.email.html"):
        r = _check(
            _tool("amtool"), "template", "render",
            f"--template.glob={DEPLOY / 'alertmanager' / 'templates' / '*.tmpl'}",
            f"--template.data={tmp_path / 'data.json'}",
            "--template.text", "{{ template \"" + name + "\" . }}",
        )  # fmt: skip
        rendered[name] = r.stdout
    assert rendered["gochat.email.subject"].strip() == "[FIRING:1] GochatNodeDown (gochat)"
    for name in ("gochat.email.text", "gochat.email.html"):
        assert "gochat node b:8701 is down" in rendered[name]
        assert "docs/observability.md#gochatnodedown" in rendered[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """deploy/alertmanager/alertmanager.yml in a real Alertmanager, its webhook pointed at a
    local HTTP server and the pages' group_wait shortened to 1 s (nothing else changed)."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert binary, "alertmanager is missing: apt-get install prometheus-alertmanager (scripts/test.sh does)"
    received: list[dict[str, Any]] = []
    handler = type("Webhook", (_Webhook,), {"received": received})
    hook = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    config = ALERTMANAGER_YML.read_text(encoding="utf-8")
    url = "http://alert-bridge:8060/dingtalk/gochat-oncall/send"
    assert config.count(url) == 1 and config.count("      group_wait: 10s\n") == 1
    config = config.replace(url, f"http://127.0.0.1:{hook.server_address[1]}/hook")
    config = config.replace("      group_wait: 10s\n", "      group_wait: 1s\n")
    (tmp_path / "alertmanager.yml").write_text(config)
    shutil.copytree(DEPLOY / "alertmanager" / "templates", tmp_path / "templates")
    port = _free_port()
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            assert time.monotonic() < deadline, "alertmanager did not start"
            time.sleep(0.1)
        yield base, received
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        hook.shutdown()
        hook.server_close()


def _api(base: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read()
    return json.loads(text) if text else None


def test_alertmanager_pages_inhibits_and_silences(alertmanager: tuple[str, list[dict[str, Any]]]) -> None:
    base, received = alertmanager

    def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
        return {
            "labels": {"alertname": name, "severity": severity, "job": "gochat", **labels},
            "annotations": {"summary": name, "runbook": f"docs/observability.md#{name.lower()}"},
        }

    _api(
        base,
        "/api/v2/alerts",
        [
            alert("GochatPostgresBreakerOpen", "critical", instance="a:8701", breaker="postgres"),
            alert("GochatCommitLag", "warning", instance="a:8701"),  # caused by the breaker: inhibited
            alert("GochatCommitLag", "warning", instance="b:8701"),  # another node: mailed
            alert("GochatErrorBudgetBurn", "critical", slo="availability"),
            alert("GochatErrorBudgetBurn", "warning", slo="availability"),  # the page covers it
            alert("GochatNodeDown", "warning", instance="c:8701"),  # planned: silenced below
        ],
    )
    silence = _check(
        _tool("amtool"), "silence", "add", f"--alertmanager.url={base}",
        "--author=test", "--comment=kernel upgrade of c", "--duration=1h",
        "alertname=GochatNodeDown", "instance=c:8701",
    ).stdout.strip()  # fmt: skip
    assert re.fullmatch(r"[0-9a-f-]{36}", silence), silence
    query = _check(_tool("amtool"), "silence", "query", f"--alertmanager.url={base}", "-q").stdout.split()
    assert query == [silence]

    want = {
        ("GochatPostgresBreakerOpen", "a:8701", "critical"): ("active", False, False),
        ("GochatCommitLag", "a:8701", "warning"): ("suppressed", True, False),
        ("GochatCommitLag", "b:8701", "warning"): ("active", False, False),
        ("GochatErrorBudgetBurn", "", "critical"): ("active", False, False),
        ("GochatErrorBudgetBurn", "", "warning"): ("suppressed", True, False),
        ("GochatNodeDown", "c:8701", "warning"): ("suppressed", False, True),
    }
    deadline = time.monotonic() + 15
    while True:
        got = {
            (a["labels"]["alertname"], a["labels"].get("instance", ""), a["labels"]["severity"]): (
                a["status"]["state"],
                bool(a["status"]["inhibitedBy"]),
                bool(a["status"]["silencedBy"]),
            )
            for a in _api(base, "/api/v2/alerts")
        }
        pages = {a["labels"]["alertname"] for n in received for a in n["alerts"]}
        if got == want and pages == {"GochatPostgresBreakerOpen", "GochatErrorBudgetBurn"}:
            break
        assert time.monotonic() < deadline, f"alerts: {got}\npages: {pages}"
        time.sleep(0.2)
    # the on-call webhook got the pages, one notification per group (alertname, job), and no warning
    assert {n["receiver"] for n in received} == {"oncall-webhook"}
    assert {a["labels"]["severity"] for n in received for a in n["alerts"]} == {"critical"}
    assert all(n["version"] == "4" and n["status"] == "firing" for n in received)


# ---- Grafana dashboard -------------------------------------------------------------------------------


def _dashboard_queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and every template variable query."""
    out = []
    for panel in model["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in model["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            out.append((f"${var['name']}", m[1]))
    return out


def test_dashboard_json_is_what_the_generator_writes() -> None:
    """deploy/grafana/gochat.json is python -m gochat.observability.dashboard's output (run
    it again after changing the metric table of docs/http-api.md or the generator)."""
    assert DASHBOARD_JSON.read_text(encoding="utf-8") == dashboard.render()
    assert dashboard.render() == dashboard.render()


def test_dashboard_has_a_panel_for_every_listed_metric() -> None:
    model = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    used = {name for _, expr in _dashboard_queries(model) for name in promql_metric_names(expr)}
    for family in dashboard.metric_families():
        wanted = f"{family.name}_bucket" if family.type == "histogram" else family.name
        assert wanted in used, f"no panel shows {family.name}"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_name_only_exported_metrics(exported: set[str]) -> None:
    model = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    queries = _dashboard_queries(model)
    assert len(queries) > 40
    known = exported | PENDING_METRICS | SCRAPE_METRICS
    unknown = {
        f"{title}: {name}": expr for title, expr in queries for name in promql_metric_names(expr) if name not in known
    }
    assert not unknown, unknown
    for title, expr in queries:
        assert promql_metric_names(expr), f"{title}: no metric in {expr}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query, its Grafana variables given values, parses (promtool checks them as
    recording rules)."""
    model = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (_, expr) in enumerate(_dashboard_queries(model)):
        expr = expr.replace("$__rate_interval", "1m").replace("$job", "gochat").replace("$instance", ".*")
        rules += [f"      - record: dashboard:query{n}", f"        expr: {json.dumps(expr)}"]
    (tmp_path / "dashboard.yml").write_text("\n".join(rules) + "\n")
    _check(_tool("promtool"), "check", "rules", str(tmp_path / "dashboard.yml"))


def test_generator_runs_as_a_module() -> None:
    r = _check(sys.executable, "-m", "gochat.observability.dashboard")
    assert r.stdout == DASHBOARD_JSON.read_text(encoding="utf-8")
