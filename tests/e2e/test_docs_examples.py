"""The code examples of README.md and docs/*.md run, as written, against real servers.

Every fenced block is classified by its language:

- ``python``: written to a file and run with this test's Python as a subprocess;
- ``sh`` / ``bash`` / ``shell``: run with ``bash -e -o pipefail`` in its own process group, which
  is stopped afterwards (so servers an example starts in the background end with it);
- ``json`` and ``toml``: data, not run; each must parse;
- no language or ``text``: diagrams, layouts and output, not run.

A block that is deliberately not run carries the marker ``<!-- example: not run, REASON -->`` on
the line right before its opening fence; an unmarked python or shell block that the test does
not run fails it (so does an unknown language, or a marker with no block after it).

Each document gets its own fresh ``gochat serve`` (embedded SQLite, free ports); its blocks run
in document order, in one temporary working directory, with empty stdin, so a later block may
rely on an earlier one (for example the accounts an example creates first). The only changes made
to an example before it runs (documented in each document as "the default addresses"):

- ``127.0.0.1:8700`` / ``127.0.0.1:8701`` become the server's WebSocket / HTTP address;
- ``.venv/bin/`` becomes the directory of this test's Python (the environment under test), which
  is also first on ``PATH``;
- ``gochat chat`` without ``--server`` gets ``--server URL --ws URL`` of the server;
- cluster examples: the ports 8710–8712 and 8720–8722 become free ones, the PostgreSQL DSN and
  Redis URL become the test's (``GOCHAT_TEST_POSTGRES_DSN``, ``GOCHAT_TEST_REDIS_URL``), and the
  environment names a private PostgreSQL schema and Redis key prefix, removed afterwards.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.conftest import GochatProcess, run

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PG_DSN = os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DOC_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DOC_REDIS_URL = "redis://127.0.0.1:6379/0"

RUN = {"python", "sh", "bash", "shell"}
DATA = {"json", "toml"}
TEXT = {"", "text"}
MARKER = re.compile(r"^<!-- example: not run, (\S.*\S) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")
BLOCK_TIMEOUT_S = 90



@dataclass
class Block:
    doc: str
    line: int
    lang: str
    code: str
    not_run: str | None  # the marker's reason

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line} ({self.lang or 'no language'})"


def documents() -> list[str]:
    return ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


def parse_blocks(doc: str) -> list[Block]:
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m:
            assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), f"{doc}:{i + 1}: a marker with no block after it"
        f = FENCE.match(lines[i])
        if f:
            start = i
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                i += 1
            assert i < len(lines), f"{doc}:{start + 1}: unterminated code block"
            marker = MARKER.match(lines[start - 1].strip()) if start else None
            blocks.append(
                Block(doc, start + 1, f.group(1), "\n".join(lines[start + 1 : i]) + "\n",
                      marker.group(1) if marker else None)
            )
        i += 1
    return blocks


def free_port_base(n: int = 3) -> int:
    """A port p with p .. p+n-1 all free on 127.0.0.1."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


class Runner:
    """Runs one document's blocks against one server."""

    def __init__(self, server: GochatProcess, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        self.bindir = str(Path(sys.executable).parent)
        self.schema = f"t_{uuid.uuid4().hex[:12]}"
        self.prefix = f"gct:{uuid.uuid4().hex[:12]}:"
        self.cluster_ws = free_port_base()
        self.cluster_http = free_port_base()
        self.used_cluster = False
        self.env = dict(os.environ)
        self.env.update(
            {
                "PATH": f"{self.bindir}{os.pathsep}{os.environ.get('PATH', '')}",
                "GOCHAT_POSTGRES_SCHEMA": self.schema,
                "GOCHAT_REDIS_PREFIX": self.prefix,
                "GOCHAT_REGISTRY_TTL_S": "3",
                "GOCHAT_REGISTRY_RENEW_S": "1",
                "GOCHAT_DRAIN_TIMEOUT_S": "3",
                "PYTHONUNBUFFERED": "1",
            }
        )

    def substitute(self, code: str) -> str:
        ws = self.server.ws_url.split("//", 1)[1].split("/", 1)[0]
        http = self.server.http_url.split("//", 1)[1]
        code = code.replace("127.0.0.1:8700", ws).replace("127.0.0.1:8701", http)
        code = code.replace(".venv/bin/", self.bindir + "/")
        code = re.sub(
            r"(\bgochat chat)(?![^\n]*--server)",
            rf"\1 --server {self.server.http_url} --ws {self.server.ws_url}",
            code,
        )
        if "8710" in code or "8720" in code or DOC_PG_DSN in code:
            self.used_cluster = True
            code = code.replace(DOC_PG_DSN, PG_DSN).replace(DOC_REDIS_URL, REDIS_URL)
            code = re.sub(r"\b871([0-2])\b", lambda m: str(self.cluster_ws + int(m.group(1))), code)
            code = re.sub(r"\b872([0-2])\b", lambda m: str(self.cluster_http + int(m.group(1))), code)
            code = code.replace("$((8710+i))", f"$(({self.cluster_ws}+i))")
        return code

    def run(self, block: Block, index: int) -> None:
        code = self.substitute(block.code)
        if block.lang == "python":
            path = self.workdir / f"example_{index}.py"
            path.write_text(code, encoding="utf-8")
            argv = [sys.executable, str(path)]
        else:
            path = self.workdir / f"example_{index}.sh"
            path.write_text(code, encoding="utf-8")
            argv = ["bash", "-e", "-o", "pipefail", str(path)]
        # output to a file, not a pipe: servers an example leaves in the background keep it open
        log_path = self.workdir / f"example_{index}.out"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                proc.wait(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
            finally:
                self._stop_group(proc.pid)
                proc.wait()
        out = log_path.read_text(errors="replace")
        assert proc.returncode == 0, f"{block.where} exited with {proc.returncode}:\n{code}\n--- output\n{out}"

    @staticmethod
    def _stop_group(pgid: int) -> None:
        """Stop what the example left running in the background (its own process group)."""
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)

    def cleanup(self) -> None:
        if not self.used_cluster:
            return
        import asyncpg
        import redis.asyncio as aioredis

        async def drop() -> None:
            conn = await asyncpg.connect(PG_DSN)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                await conn.close()
            r = aioredis.Redis.from_url(REDIS_URL)
            try:
                keys = [k async for k in r.scan_iter(match=f"{self.prefix}*", count=1000)]
                if keys:
                    await r.delete(*keys)
            finally:
                await r.aclose()

        run(drop())


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    server = GochatProcess(tmp_path / "data")
    server.start()
    work = tmp_path / "work"
    work.mkdir()
    r = Runner(server, work)
    try:
        yield r
    finally:
        server.stop()
        r.cleanup()


def _unrunnable(blocks: list[Block]) -> list[str]:
    """Blocks of a language the test does not know how to treat."""
    bad = []
    for b in blocks:
        if b.lang not in RUN | DATA | TEXT:
            bad.append(f"{b.where}: unknown language; use python/sh for examples, json/toml/text for the rest")
    return bad


@pytest.mark.parametrize("doc", documents())
def test_doc_examples_run(doc: str, runner: Runner) -> None:
    blocks = parse_blocks(doc)
    assert not _unrunnable(blocks), _unrunnable(blocks)
    for index, block in enumerate(blocks):
        if block.lang == "json":
            orjson.loads(block.code)
        elif block.lang == "toml":
            tomllib.loads(block.code)
        if block.not_run is not None or block.lang not in RUN:
            continue
        runner.run(block, index)



def test_every_marker_gives_a_reason_and_precedes_an_example() -> None:
    for doc in documents():
        for b in parse_blocks(doc):
            if b.not_run is not None:
                assert b.lang in RUN, f"{b.where}: only python and shell examples take a not-run marker"


def _documented_metrics() -> dict[str, str]:
    text = (ROOT / "docs" / "http-api.md").read_text(encoding="utf-8")
    begin, end = "<!-- metrics:begin -->", "<!-- metrics:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    table = text[text.index(begin) : text.index(end)]
    return {m[1]: m[2] for m in re.finditer(r"^\| `(gochat_[a-z_]+)(?:\{[a-z_,]+\})?` \| (\w+) \|", table, re.M)}


def test_metrics_doc_lists_the_exported_names(gochat_server: GochatProcess) -> None:
    """docs/http-api.md names every metric family /metrics exports, with its type, and no other."""
    import aiohttp

    from gochat.protocol.frames import Error, Send
    from tests.e2e.rawclient import connect

    async def scrape() -> str:
        c = await connect(gochat_server.ws_url)  # an ERROR (108) makes gochat_errors_total appear
        c.send(Send(1, 1, 2, b"\0" * 16, b"x", rid=5))
        await c.expect(Error)
        c.close()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gochat_server.http_url}/healthz") as r:
                assert r.status == 200
            async with http.get(f"{gochat_server.http_url}/metrics") as r:
                return await r.text()

    exported = dict(re.findall(r"^# TYPE (\S+) (\S+)$", run(scrape()), re.M))
    assert exported == _documented_metrics()
