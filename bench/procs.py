"""Processes of a bench run (servers under test, load generators) and what /proc says about them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS = BENCH / "peers"
NODE_DIR = PEERS / "node"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- /proc ---------------------------------------------------------------------------------------
def cpu_ns(pid: int) -> int:
    """CPU time (user + system) of every thread of ``pid``, in ns (schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_split_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``, all threads (/proc/PID/stat, clock-tick resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    return int(fields[11]) * _TICK_S, int(fields[12]) * _TICK_S


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of ``pid`` in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def sockstat() -> dict[str, int]:
    """TCP line of /proc/net/sockstat: inuse, orphan, tw, alloc, mem (pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    return {}


def slab_bytes(names: tuple[str, ...] = ("TCP", "sock_inode_cache", "dentry", "filp")) -> dict[str, int]:
    """Bytes in the kernel slab caches that grow per TCP socket (needs root; {} otherwise)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in names:
                    out[parts[0]] = int(parts[1]) * int(parts[3])
    except OSError:
        pass
    return out


def proc_io(pid: int) -> dict[str, int]:
    """/proc/PID/io (all threads): ``syscw`` counts write(2)/writev(2) calls on any fd, not
    send/sendto/sendmsg; {} when unreadable."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest)
    return out


# ---- socket-write counter: the LD_PRELOAD shim bench/peers/syscount.c ------------------------------
SYSCOUNT_CALLS = ("write", "writev", "send", "sendto", "sendmsg", "sendmmsg")
# magic, pid, one u64 per call, bytes, eagain, other (non-socket calls), sendmmsg messages
_SYSCOUNT = struct.Struct("<8sQ6QQQQQ")


def read_syscount(d: Path) -> dict[str, int] | None:
    """Sum of the shim's counters over every process that wrote a page into ``d`` (one
    ``<pid>.cnt`` each); None when no process loaded the shim. ``calls`` = all socket write calls."""
    total = dict.fromkeys((*SYSCOUNT_CALLS, "bytes", "eagain", "other", "sendmmsg_msgs"), 0)
    seen = 0
    for path in d.glob("*.cnt"):
        try:
            raw = path.read_bytes()[: _SYSCOUNT.size]
        except OSError:
            continue
        if len(raw) < _SYSCOUNT.size:
            continue
        magic, _pid, *vals = _SYSCOUNT.unpack(raw)
        if magic != b"SYSCNT01":
            continue
        seen += 1
        for key, v in zip(total, vals, strict=True):
            total[key] += v
    if not seen:
        return None
    total["calls"] = sum(total[k] for k in SYSCOUNT_CALLS)
    total["processes"] = seen
    return total


# ---- machine facts -----------------------------------------------------------------------------
def _cmd_out(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    versions: dict[str, str] = {"python": platform.python_version()}
    for pkg in ("picows", "uvloop", "websockets", "aiohttp", "socketify", "Cython", "numpy", "matplotlib"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    if shutil.which("node"):
        versions["node"] = _cmd_out(["node", "--version"])
        pkg = NODE_DIR / "node_modules" / "ws" / "package.json"
        if pkg.exists():
            versions["node-ws"] = json.loads(pkg.read_text())["version"]
    from bench.peers import brokers

    versions.update(brokers.versions())
    versions["cc"] = _cmd_out(["cc", "--version"]).splitlines()[0] if shutil.which("cc") else ""
    commit = _cmd_out(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    diff = _cmd_out(["git", "-C", str(ROOT), "diff", "HEAD"])
    dirty = f"+dirty.{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else ""
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "nofile_limit": _nofile(),
        "versions": versions,
        "git_commit": commit + dirty,
        "loadgen": _loadgen_impl(),
        "clk_tck": os.sysconf("SC_CLK_TCK"),
    }


def _loadgen_impl() -> str:
    from bench import native

    return native.loadgen_impl()


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


# ---- CPU placement -------------------------------------------------------------------------------
@dataclass
class Placement:
    server: str  # taskset cpu list for the server under test
    load: str  # taskset cpu list for load generators

    def prefix(self, cpus: str) -> list[str]:
        return ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []

    @classmethod
    def default(cls) -> Placement:
        n = os.cpu_count() or 1
        if n < 2:
            return cls("", "")
        return cls("0", ",".join(str(i) for i in range(1, n)))


# ---- servers under test --------------------------------------------------------------------------
_LISTEN = re.compile(rb"listening (\d+)")
_GOCHAT = re.compile(rb"gochat listening ws=(\S+) http=(\S+)")
_COUNTERS = re.compile(rb"counters writes=(\d+) frames=(\d+)")


@dataclass
class Target:
    name: str
    kind: str  # "gochat" or "raw" (the shared broadcast protocol)
    desc: str
    coalesces: bool = False
    proto: str = "ws"  # "ws", or a broker the load generator adapts to: "nats" (over WS), "redis" (TCP)
    #: environment of the server process (a gochat variant's settings)
    env: dict[str, str] = field(default_factory=dict)
    #: export the server's spans to an OTLP/HTTP sink in this process (tracing targets)
    otlp_sink: bool = False

    def command(self) -> list[str]:
        py = sys.executable
        if self.name == "gochat-baseline" and not os.environ.get("BENCH_BASELINE_TREE"):
            raise SystemExit(
                "target gochat-baseline: set BENCH_BASELINE_TREE to a checkout of the baseline commit "
                "with its extensions built (python setup.py build_ext --inplace)"
            )
        if self.kind == "gochat":
            return [py, "-m", "gochat.cli", "serve"]
        if self.name == "cfloor":
            from bench import native

            return [str(native.cfloor()), "0"]
        if self.name == "cfloor-coalesce":
            from bench import native

            return [str(native.cfloor()), "0", "--coalesce"]
        if self.name == "cfloor-relay":
            from bench import native

            return [str(native.cfloor()), "0", "--coalesce", "--relay"]
        if self.name == "picows":
            return [py, str(PEERS / "picows_peer.py"), "0"]
        if self.name == "aiohttp":
            return [py, str(PEERS / "aiohttp_peer.py"), "0"]
        if self.name == "websockets":
            return [py, str(PEERS / "websockets_peer.py"), "0"]
        if self.name == "websockets-relay":
            return [py, str(PEERS / "websockets_peer.py"), "0", "--relay"]
        if self.name == "node-ws":
            return ["node", str(NODE_DIR / "server.js"), "0"]
        if self.name == "socketify":
            return [py, str(PEERS / "socketify_peer.py"), "0"]
        raise ValueError(self.name)

    def available(self) -> str | None:
        """None when this target can run here, else why not."""
        if self.proto != "ws":
            from bench.peers import brokers

            return brokers.available(self.proto)
        if self.name == "socketify":
            try:
                importlib.metadata.version("socketify")
            except importlib.metadata.PackageNotFoundError:
                return "socketify not installed (pip install socketify)"
        if self.name.startswith("websockets"):
            try:
                importlib.metadata.version("websockets")
            except importlib.metadata.PackageNotFoundError:
                return "websockets not installed (pip install -r bench/requirements.txt)"
        if self.name == "node-ws":
            if not shutil.which("node"):
                return "node not installed"
            if not (NODE_DIR / "node_modules" / "ws").exists():
                if not shutil.which("npm"):
                    return "npm not installed"
                r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True)
                if r.returncode != 0:
                    return "npm ci failed in bench/peers/node"
        if self.name.startswith("cfloor") and not (shutil.which("cc") or shutil.which("gcc")):
            return "no C compiler"
        if self.otlp_sink:
            try:
                importlib.metadata.version("opentelemetry-sdk")
                importlib.metadata.version("opentelemetry-exporter-otlp-proto-http")
            except importlib.metadata.PackageNotFoundError:
                return "the OpenTelemetry SDK is not installed (pip install -e '.[otel]')"
        return None


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("gochat", "gochat", "gochat serve: picows + Cython coalescing FanoutWriter, real protocol", True),
        Target(
            "gochat-baseline",
            "gochat",
            "gochat serve from the checkout at $BENCH_BASELINE_TREE (an earlier commit, to compare)",
            True,
            env={"PYTHONPATH": os.environ.get("BENCH_BASELINE_TREE", "")},
        ),
        Target(
            "gochat-sndbuf-auto",
            "gochat",
            "gochat serve with socket_sndbuf = 0: the kernel autotunes each socket's send buffer",
            True,
            env={"GOCHAT_SOCKET_SNDBUF": "0"},
        ),
        Target(
            "gochat-reference",
            "gochat",
            "gochat serve with native_session = false: frames decoded and dispatched by the Python reference gateway",
            True,
            env={"GOCHAT_NATIVE_SESSION": "false"},
        ),
        # tracing cost (docs/observability.md, "Tracing"): `gochat` itself is the 0 % case
        Target(
            "gochat-trace-1pct",
            "gochat",
            "gochat serve with trace_sample_rate = 0.01, spans exported over OTLP/HTTP to a sink in the harness",
            True,
            env={"GOCHAT_TRACE_SAMPLE_RATE": "0.01"},
            otlp_sink=True,
        ),
        Target(
            "gochat-trace-100pct",
            "gochat",
            "gochat serve with trace_sample_rate = 1: every SEND traced, exported to the harness's OTLP sink",
            True,
            env={"GOCHAT_TRACE_SAMPLE_RATE": "1"},
            otlp_sink=True,
        ),
        Target("cfloor", "raw", "C epoll, one send(2) per message per socket (floor)"),
        Target("cfloor-coalesce", "raw", "C epoll, per-batch coalescing: one send(2) per socket per epoll batch", True),
        Target("picows", "raw", "bare picows (uvloop), transport.send per message per socket"),
        Target("websockets", "raw", "websockets 'broadcast()' (asyncio API, uvloop)"),
        Target("aiohttp", "raw", "aiohttp WebSocketResponse.send_bytes per socket (uvloop)"),
        Target("node-ws", "raw", "Node 'ws' library, ws.send per socket"),
        Target("websockets-relay", "raw", "websockets relay: forwards [dest][payload], stores nothing"),
        Target("cfloor-relay", "raw", "C epoll relay (floor for direct): forwards [dest][payload], one send(2) "
               "per destination per epoll batch, stores nothing", True),
        Target("socketify", "raw", "socketify (uWebSockets), ws.publish to a topic every connection joins"),
        Target("nats", "raw", "nats-server WebSocket listener: PUB/SUB, NATS text protocol in WS frames",
               proto="nats"),
        Target("redis", "raw", "broker hop reference: Redis PUBLISH to SUBSCRIBEd RESP connections, "
               "plain TCP, not WebSocket", proto="redis"),
    )
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OtlpSink:
    """An OTLP/HTTP receiver that accepts spans and discards them (POST /v1/traces → 200), in the
    harness's own process: what a tracing target's server pays is its own CPU (building,
    batching, encoding, posting spans), not a collector's."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.url = ""
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        async def traces(request: web.Request) -> web.Response:
            self.requests += 1
            self.bytes += len(await request.read())
            return web.Response(body=b"", content_type="application/x-protobuf")  # an empty response message

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = _free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class ServerProc:
    target: Target
    placement: Placement
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    port: int = 0
    ws_url: str = ""
    http_url: str = ""
    counters: tuple[int, int] | None = None
    # the LD_PRELOAD shim's page directory (None: the shim is not in use for this server)
    syscount_dir: Path | None = None
    _counter_event: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None
    otlp: OtlpSink | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 60.0) -> None:
        if self.target.proto != "ws":
            from bench.peers import brokers

            self.port = _free_port()
            cmd = brokers.server_command(self.target.proto, self.port, self.workdir)
        else:
            cmd = self.target.command()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        if self.target.kind == "gochat":
            # A fresh database per start: the scenarios register their users by fixed names
            # (bench_s0, ...), so a rerun with the same --out would find them taken (409), and
            # a measurement must not depend on what an earlier run left in the store.
            data = self.workdir / "gochat-data"
            shutil.rmtree(data, ignore_errors=True)
            cmd += ["--data-dir", str(data), "--host", "127.0.0.1", "--ws-port", "0", "--http-port", "0"]
            env.update(
                {
                    # The bench measures the data plane: the per-connection request rate limit
                    # (a policy) would throttle the publisher and the storm.
                    "GOCHAT_RATE_LIMIT_PER_S": "10000000",
                    "GOCHAT_RATE_LIMIT_BURST": "10000000",
                    "GOCHAT_ACCESS_TTL_S": "7200",
                    "GOCHAT_LOG_LEVEL": "INFO",
                }
            )
        env.update(self.target.env)
        env.update(self.env)
        if self.target.otlp_sink:
            self.otlp = OtlpSink()
            await self.otlp.start()
            env["GOCHAT_OTLP_ENDPOINT"] = self.otlp.url
        self._preload_syscount(env)
        self.log_path = self.workdir / f"{self.target.name}-server.log"
        self._log = open(self.log_path, "ab")
        # BENCH_SERVER_WRAP: a command prefix for the server under test only, e.g.
        # "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p" (exact instruction counts)
        wrap = shlex.split(os.environ.get("BENCH_SERVER_WRAP", ""))
        self.proc = await asyncio.create_subprocess_exec(
            *self.placement.prefix(self.placement.server),
            *wrap,
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=str(self.workdir),
        )
        # for profilers that attach (profiles/record.sh)
        (self.workdir / f"{self.target.name}-server.pid").write_text(str(self.proc.pid))
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"{self.target.name} did not start; see {self.log_path}") from None

    async def _read(self, ready: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                if not ready.done():
                    ready.set_exception(RuntimeError(f"{self.target.name} exited; see {self.log_path}"))
                return
            self._log.write(line)
            self._log.flush()
            if not ready.done() and self.target.proto != "ws":
                from bench.peers import brokers

                if brokers.READY[self.target.proto].search(line):
                    scheme = "tcp" if self.target.proto == "redis" else "ws"
                    self.ws_url = f"{scheme}://127.0.0.1:{self.port}"
                    ready.set_result(None)
                continue
            if not ready.done():
                m = _GOCHAT.search(line)
                if m:
                    self.ws_url, self.http_url = m.group(1).decode(), m.group(2).decode()
                    self.port = int(self.ws_url.rsplit(":", 1)[1].split("/")[0])
                    ready.set_result(None)
                    continue
                m = _LISTEN.search(line)
                if m and self.target.kind != "gochat":
                    self.port = int(m.group(1))
                    self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
                    ready.set_result(None)
                    continue
            m = _COUNTERS.search(line)
            if m:
                self.counters = (int(m.group(1)), int(m.group(2)))
                self._counter_event.set()

    def _preload_syscount(self, env: dict[str, str]) -> None:
        """Start the server (only it: the load generators get the plain environment) under the
        socket-write counter, with a fresh page directory."""
        from bench import native

        if os.environ.get("BENCH_NO_SYSCOUNT", "") not in ("", "0"):
            return
        lib = native.syscount()
        if lib is None:
            return
        d = self.workdir / f"syscount-{self.target.name}"
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.cnt"):
            old.unlink()
        env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(lib)
        env["BENCH_SYSCOUNT_DIR"] = str(d)
        self.syscount_dir = d

    def socket_writes(self) -> dict[str, int] | None:
        """The shim's counters now (cumulative since the server started); None without the shim
        or when the server never loaded it (a static binary)."""
        return read_syscount(self.syscount_dir) if self.syscount_dir is not None else None

    async def write_counters(self) -> dict[str, int] | None:
        """Data-plane counters: gochat's /metrics, or cfloor's own (SIGUSR1)."""
        if self.target.kind == "gochat":
            async with aiohttp.ClientSession() as http, http.get(f"{self.http_url}/metrics") as r:
                text = await r.text()
            out = {}
            for name in ("gochat_socket_writes_total", "gochat_frames_out_total", "gochat_dropped_frames_total",
                         "gochat_slow_consumer_disconnects_total", "gochat_bytes_out_total"):
                m = re.search(rf"^{name} (\S+)$", text, re.M)
                if m:
                    out[name.removeprefix("gochat_").removesuffix("_total")] = int(float(m.group(1)))
            return out
        if self.target.name.startswith("cfloor") and self.proc is not None:
            self._counter_event.clear()
            self.proc.send_signal(signal.SIGUSR1)
            try:
                await asyncio.wait_for(self._counter_event.wait(), 5)
            except TimeoutError:
                return None
            assert self.counters is not None
            return {"socket_writes": self.counters[0], "frames_out": self.counters[1]}
        return None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        with contextlib.suppress(Exception):
            self._log.close()
        if self.otlp is not None:
            log(f"{self.target.name}: OTLP sink took {self.otlp.requests} exports, {self.otlp.bytes} bytes")
            await self.otlp.stop()
            self.otlp = None


# ---- load generator processes --------------------------------------------------------------------
class LoadProc:
    """One ``python -m bench.loadgen`` process, driven over stdin/stdout JSON lines."""

    def __init__(self, name: str, cfg: dict[str, Any], placement: Placement, workdir: Path) -> None:
        self.name = name
        self.cfg = cfg
        self.placement = placement
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 300.0) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self._err = open(self.workdir / f"loadgen-{self.name}.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.placement.prefix(self.placement.load),
            sys.executable, "-m", "bench.loadgen", json.dumps(self.cfg),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._err,
            env=env,
            cwd=str(ROOT),
            limit=1 << 20,
        )
        return await self.expect("ready", timeout)

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"loadgen {self.name}: no '{event}' within {timeout}s")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                raise RuntimeError(f"loadgen {self.name} exited (see {self.workdir}/loadgen-{self.name}.log)")
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == event:
                return msg
            if msg.get("event") == "error":
                raise RuntimeError(f"loadgen {self.name}: {msg.get('error')}")

    async def cmd(self, line: str, event: str, timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        await self.proc.stdin.drain()
        return await self.expect(event, timeout)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(Exception):
            self._err.close()


# ---- gochat users ----------------------------------------------------------------------------
async def gochat_users(http_url: str, n: int, prefix: str) -> list[tuple[int, str]]:
    """Create ``n`` users through the HTTP API and log each in: [(user_id, access_token)]."""
    out: list[tuple[int, str]] = [(0, "")] * n
    sem = asyncio.Semaphore(4)
    password = "bench-password-1"

    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> None:
            name = f"bench_{prefix}{i}"
            async with sem:
                async with http.post(f"{http_url}/v1/users", json={"username": name, "password": password}) as r:
                    if r.status != 201:
                        raise RuntimeError(f"create user {name}: {r.status} {await r.text()}")
                    uid = (await r.json())["user_id"]
                async with http.post(
                    f"{http_url}/v1/auth/login", json={"username": name, "password": password}
                ) as r:
                    if r.status != 200:
                        raise RuntimeError(f"login {name}: {r.status} {await r.text()}")
                    out[i] = (uid, (await r.json())["access_token"])

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def gochat_distinct_tokens(http_url: str, n: int, prefix: str, users: int = 8) -> list[str]:
    """``n`` distinct access tokens: ``users`` logins, then chains of refreshes (a refresh issues
    a new access token without the password hash, so thousands take seconds, not minutes)."""
    password = "bench-password-1"
    chains: list[list[str]] = [[] for _ in range(users)]
    per = -(-n // users)
    async with aiohttp.ClientSession() as http:

        async def chain(i: int) -> None:
            name = f"bench_{prefix}{i}"
            async with http.post(f"{http_url}/v1/users", json={"username": name, "password": password}) as r:
                if r.status != 201:
                    raise RuntimeError(f"create user {name}: {r.status} {await r.text()}")
            async with http.post(f"{http_url}/v1/auth/login", json={"username": name, "password": password}) as r:
                if r.status != 200:
                    raise RuntimeError(f"login {name}: {r.status} {await r.text()}")
                pair = await r.json()
            chains[i].append(pair["access_token"])
            while len(chains[i]) < per:
                async with http.post(f"{http_url}/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"refresh {name}: {r.status} {await r.text()}")
                    pair = await r.json()
                chains[i].append(pair["access_token"])

        await asyncio.gather(*(chain(i) for i in range(users)))
    return [t for c in chains for t in c][:n]


def source_ips(i: int, per: int = 1) -> list[str]:
    """Distinct loopback source addresses for load process ``i`` (spreads the ephemeral ports)."""
    return [f"127.0.{10 + i}.{1 + j}" for j in range(per)]
