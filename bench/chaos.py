"""``python -m bench chaos``: a chaos soak of a gochat cluster (issue #16, resilience).

    python -m bench chaos [--duration 180] [--nodes 3] [--senders 8] [--seed N] [--out DIR]

Starts ``--nodes`` real ``gochat serve`` nodes in cluster mode (their own PostgreSQL schema and
Redis key prefix, both dropped afterwards) with PostgreSQL and Redis each behind a fault
injecting TCP proxy (``tests/tcpproxy.py``), and short circuit-breaker settings (window 3 s,
5 calls, open 1 s). For ``--duration`` seconds it injects random faults into either backend or
both — added latency, dropped connections, a dead backend (connections reset), a blackhole
(accepts, never answers), flapping — each for a few seconds with quiet gaps between them,
while ``--senders`` users (one connection each, spread over the nodes) send continuously to a
direct peer and to one group, retrying every retryable error with the same ``client_msg_id``,
two of them also read (HISTORY, conversation.list, presence.query), and every connection records
the DELIVERs it receives. Then the faults are cleared, traffic goes on for ``--tail`` seconds,
every message still unacknowledged is retried until it is acknowledged (``--settle`` seconds at
most), and every conversation's HISTORY is read back.

Reported (``results.json`` and ``results.md`` under ``--out``, default
``bench/results/<UTC time>-chaos/``): messages acknowledged, pushed (DELIVERs received, and how
many of the pushes due), stored, **lost** (acknowledged but not stored), **duplicated** (stored
twice for one ``client_msg_id``, or delivered twice to one connection), answers by code, the
slowest answer and requests left unanswered past the bound (15 s), node crashes, how soon SENDs
were acknowledged again and whether pushes came back (the push ratio of the tail), and the
timeline: faults, breaker states and degradation switches as each node's ``/metrics`` showed
them (polled every 0.5 s). The exit status is 1 when anything was lost or duplicated or a node
died, else 0.

The client pieces (:class:`Peer`, :func:`send_reliably`, :func:`read_conversation`,
:func:`account`) are also what ``tests/e2e/test_resilience_e2e.py`` drives its nodes with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from gochat.errors import ERRORS, ErrorCode
from gochat.protocol import FLAG_DUPLICATE, FLAG_MORE, FLAG_PARTIAL, EventType, Kind, decode, encode_many
from gochat.protocol.frames import (
    Auth,
    AuthOk,
    Call,
    CallResult,
    Deliver,
    Error,
    Event,
    GoAway,
    History,
    HistoryResult,
    Send,
    SendAck,
)
from gochat.protocol.frames import Message as WireMessage

ROOT = Path(__file__).resolve().parent.parent
PG_DSN = os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

#: ERROR 504: the node is read-only (its postgres breaker is open); retryable
READ_ONLY = int(getattr(ErrorCode, "READ_ONLY", 504))
#: EVENT type DEGRADED: value = bitmask of the node's degradation switches
DEGRADED_EVENT = int(EventType.DEGRADED)
DEGRADED_BITS = {1: "read_only", 2: "cache_only", 4: "non_core_off"}
#: every request must be answered within this: the store's command timeout (10 s) plus a margin
ANSWER_BOUND_S = 15.0
#: the admin API's operator credential on the nodes this module starts
ADMIN_TOKEN = "chaos-admin-token-0123456789"

#: breaker settings short enough for a test or a soak to see them act
OPEN_S = 1.0
FAST_BREAKERS = {
    "GOCHAT_BREAKER_WINDOW_S": "3",
    "GOCHAT_BREAKER_MIN_CALLS": "5",
    "GOCHAT_BREAKER_OPEN_S": f"{OPEN_S:g}",
    "GOCHAT_BREAKER_SLOW_CALL_MS": "1000",
}


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def retryable(code: int) -> bool:
    spec = ERRORS.get(code)
    return bool(spec is not None and spec.retryable) or code == READ_ONLY


def proxied_url(url: str, port: int) -> str:
    """``url`` (a PostgreSQL DSN or a Redis URL) pointed at 127.0.0.1:``port`` instead."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user + '@' if user else ''}127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def backend_address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


# ---- a client that answers requests by rid, reconnects, and keeps what is pushed --------------
class _Conn(WSListener):  # type: ignore[misc]
    def __init__(self, owner: Peer, number: int) -> None:
        super().__init__()
        self.owner = owner
        self.number = number
        self.transport: WSTransport | None = None
        self.closed = asyncio.Event()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            for f in decode(frame.get_payload_as_bytes(), 1 << 24):
                self.owner._on_frame(self, f)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed.set()
        self.owner._on_closed(self)


class Unanswered(Exception):
    """No answer within the bound (a hang as the contract sees it)."""


class Peer:
    """One user's connection to one node, reconnected when lost (AUTH is retried while the
    node answers 501). Replies go to the request waiting for their rid; DELIVERs are counted
    per connection (``delivers[connection number][msg_id]``), DEGRADED events kept with their
    time."""

    def __init__(self, name: str, user_id: int, token: str, url: str) -> None:
        self.name = name
        self.user_id = user_id
        self.token = token
        self.url = url
        self.conn: _Conn | None = None
        self.connections = 0
        self.delivers: dict[int, Counter[int]] = {}
        #: (conversation as the receiver sees it, seq) of every DELIVER, per connection, in order
        self.deliver_order: dict[int, list[tuple[int, int, int]]] = {}
        self.degraded: list[tuple[float, int]] = []
        self.goaways: list[GoAway] = []
        self.lost_connections = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._rids = itertools.count(1)
        self._connecting: asyncio.Lock | None = None

    # frames
    def _on_frame(self, conn: _Conn, f: Any) -> None:
        if isinstance(f, Deliver):
            m = f.message
            self.delivers.setdefault(conn.number, Counter())[m.msg_id] += 1
            self.deliver_order.setdefault(conn.number, []).append((m.kind, m.conv_id, m.seq))
        elif isinstance(f, Event):
            if f.type == DEGRADED_EVENT:
                self.degraded.append((time.monotonic(), int(f.value)))
        elif isinstance(f, GoAway):
            self.goaways.append(f)
        elif isinstance(f, (AuthOk, SendAck, HistoryResult, CallResult, Error)):
            fut = self._waiting.pop(f.rid, None)
            if fut is not None and not fut.done():
                fut.set_result(f)

    def _on_closed(self, conn: _Conn) -> None:
        if self.conn is conn:
            self.conn = None
            self.lost_connections += 1
        for rid, fut in list(self._waiting.items()):
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))
            self._waiting.pop(rid, None)

    @property
    def degraded_now(self) -> int:
        return self.degraded[-1][1] if self.degraded else 0

    # connection
    async def connect(self, deadline_s: float = 30.0) -> None:
        """Until authenticated (``deadline_s`` at most): reconnect and AUTH again while the
        node is unreachable or answers 501."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.conn is not None:
                return
            deadline = time.monotonic() + deadline_s
            delay = 0.1
            while True:
                try:
                    if await self._connect_once():
                        return
                except (OSError, TimeoutError, ConnectionError, Unanswered):
                    pass
                if time.monotonic() > deadline:
                    raise ConnectionError(f"{self.name}: not connected to {self.url} within {deadline_s:g} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _connect_once(self) -> bool:
        self.connections += 1
        number = self.connections
        _, listener = await asyncio.wait_for(ws_connect(lambda: _Conn(self, number), self.url), 5)
        conn = cast(_Conn, listener)
        rid = next(self._rids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        assert conn.transport is not None
        conn.transport.send(WSMsgType.BINARY, encode_many([Auth(self.token, rid=rid)]))
        try:
            reply = await asyncio.wait_for(fut, ANSWER_BOUND_S)
        except BaseException:
            self._waiting.pop(rid, None)
            conn.transport.disconnect()
            raise
        if isinstance(reply, AuthOk):
            self.conn = conn
            return True
        conn.transport.disconnect()
        if isinstance(reply, Error) and retryable(reply.code):
            await asyncio.sleep(max(reply.retry_after_ms, 50) / 1000)
            return False
        raise RuntimeError(f"{self.name}: AUTH refused: {reply!r}")

    async def request(self, frame: Any, timeout: float = ANSWER_BOUND_S) -> Any:
        """Send ``frame`` (its rid is set here) and return the reply. Raises
        :class:`Unanswered` after ``timeout``, ``ConnectionError`` when the connection is lost
        (then the next request reconnects)."""
        if self.conn is None:
            await self.connect()
        conn = self.conn
        if conn is None or conn.transport is None:
            raise ConnectionError("not connected")
        rid = next(self._rids)
        frame.rid = rid
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        conn.transport.send(WSMsgType.BINARY, encode_many([frame]))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise Unanswered(f"{type(frame).__name__} unanswered after {timeout:g} s") from None
        finally:
            self._waiting.pop(rid, None)

    async def call(self, method: str, params: dict[str, Any], timeout: float = ANSWER_BOUND_S) -> Any:
        """The JSON result of a CALL, or the ERROR frame."""
        r = await self.request(Call(method, json.dumps(params).encode()), timeout)
        return json.loads(r.payload) if isinstance(r, CallResult) else r

    def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.disconnect()


# ---- what clients saw ---------------------------------------------------------------------------
@dataclass
class Answers:
    """Every answer (or its absence) to the requests made through :func:`send_reliably` and
    :func:`probe`: counts by outcome, the slowest answer, and what broke the contract."""

    #: "ack", "dup_ack", "history", "history_partial", "call", "err:<code>", "unanswered",
    #: "connection_lost"
    counts: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    #: (time, request, outcome, seconds) of answers later than the bound or never given
    unanswered: list[tuple[float, str, str, float]] = field(default_factory=list)
    #: errors that break the contract: not retryable, or retryable without retry_after_ms
    bad: list[str] = field(default_factory=list)
    #: (time, code) of every ERROR answer
    errors: list[tuple[float, int]] = field(default_factory=list)

    def record(self, what: str, started: float, reply: Any) -> str:
        took = time.monotonic() - started
        self.slowest_s = max(self.slowest_s, took)
        if isinstance(reply, SendAck):
            outcome = "dup_ack" if reply.flags & FLAG_DUPLICATE else "ack"
        elif isinstance(reply, Error):
            outcome = f"err:{reply.code}"
            self.errors.append((time.monotonic(), reply.code))
            if not retryable(reply.code):
                self.bad.append(f"{what}: not retryable: {reply!r}")
            elif reply.retry_after_ms <= 0:
                self.bad.append(f"{what}: retryable without retry_after_ms: {reply!r}")
        elif isinstance(reply, HistoryResult):
            outcome = "history_partial" if reply.flags & FLAG_PARTIAL else "history"
        elif isinstance(reply, (CallResult, dict)):
            outcome = "call"
        else:
            outcome = type(reply).__name__
        self.counts[outcome] += 1
        if took > ANSWER_BOUND_S:
            self.unanswered.append((time.monotonic(), what, outcome, took))
        return outcome

    def codes_since(self, t: float) -> Counter[int]:
        return Counter(code for at, code in self.errors if at >= t)


def conv_key(kind: int, viewer: int, conv_id: int) -> tuple[int, int, int]:
    """A conversation independent of who looks at it (``viewer`` addresses it as ``conv_id``):
    (kind, lower user id, higher user id) for a direct one, (kind, group id, 0) for a group."""
    return (kind, min(viewer, conv_id), max(viewer, conv_id)) if kind == Kind.DIRECT else (kind, conv_id, 0)


@dataclass
class Msg:
    """One logical message: sent (and retried with the same client_msg_id) until acknowledged."""

    sender: Peer
    kind: int
    conv_id: int
    body: bytes
    cmid: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    ack: SendAck | None = None
    attempts: int = 0
    created: float = field(default_factory=time.monotonic)
    acked_at: float | None = None
    #: retries answered DUPLICATE (the first ACK was lost on the way, or came late)
    duplicate_acks: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return conv_key(self.kind, self.sender.user_id, self.conv_id)


async def send_reliably(
    msg: Msg, answers: Answers, *, give_up: Callable[[], bool] = lambda: False, max_backoff_s: float = 2.0
) -> bool:
    """Send ``msg`` until it is acknowledged: a retryable ERROR waits ``retry_after_ms`` (capped,
    with jitter), an unanswered SEND or a lost connection is retried at once (reconnecting), all
    with the same ``client_msg_id``. Stops without an ACK when ``give_up()`` turns true between
    tries, or on an ERROR that is not retryable. True when acknowledged."""
    backoff = 0.05
    while msg.ack is None:
        if give_up():
            return False
        msg.attempts += 1
        started = time.monotonic()
        try:
            reply = await msg.sender.request(Send(msg.kind, 1, msg.conv_id, msg.cmid, msg.body))
        except Unanswered:
            answers.counts["unanswered"] += 1
            answers.unanswered.append((time.monotonic(), "SEND", "none", time.monotonic() - started))
            continue
        except ConnectionError:
            answers.counts["connection_lost"] += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)
            continue
        outcome = answers.record("SEND", started, reply)
        if isinstance(reply, SendAck):
            msg.ack = reply
            msg.acked_at = time.monotonic()
            if outcome == "dup_ack":
                msg.duplicate_acks += 1
            return True
        if isinstance(reply, Error) and retryable(reply.code):
            wait = min(max(reply.retry_after_ms / 1000, 0.02), max_backoff_s)
            await asyncio.sleep(wait * random.uniform(0.5, 1.0))
            continue
        return False
    return True


async def probe(peer: Peer, answers: Answers, kind: int, conv_id: int, presence_of: list[int] | None = None) -> None:
    """One store-backed read (HISTORY of the newest page), one CALL conversation.list and, with
    ``presence_of``, one CALL presence.query (Redis-backed), each recorded in ``answers``; a
    lost connection or no answer is recorded too."""
    requests: list[tuple[str, Any]] = [
        ("HISTORY", History(kind, conv_id, 0, 10, flags=1)),
        ("CALL", Call("conversation.list", b"{}")),
    ]
    if presence_of:
        requests.append(("CALL presence.query", Call("presence.query", json.dumps({"user_ids": presence_of}).encode())))
    for what, frame in requests:
        started = time.monotonic()
        try:
            reply = await peer.request(frame)
        except Unanswered:
            answers.counts["unanswered"] += 1
            answers.unanswered.append((time.monotonic(), what, "none", time.monotonic() - started))
            continue
        except ConnectionError:
            answers.counts["connection_lost"] += 1
            continue
        answers.record(what, started, reply)


async def read_conversation(peer: Peer, kind: int, conv_id: int, deadline_s: float = 60.0) -> list[WireMessage]:
    """Every message of a conversation, paging HISTORY forward from seq 1 (retryable errors,
    pages answered from a degraded node's cache (PARTIAL) and lost connections are retried
    until ``deadline_s``)."""
    out: list[WireMessage] = []
    from_seq = 1
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            r = await peer.request(History(kind, conv_id, from_seq, 500))
        except (Unanswered, ConnectionError):
            r = None
        if isinstance(r, HistoryResult) and not r.flags & FLAG_PARTIAL:
            out += r.messages
            if not (r.flags & FLAG_MORE) or not r.messages:
                return out
            from_seq = r.messages[-1].seq + 1
            continue
        if isinstance(r, Error) and not retryable(r.code):
            raise RuntimeError(f"HISTORY {kind}/{conv_id} refused: {r!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"HISTORY {kind}/{conv_id} not answered within {deadline_s:g} s")
        await asyncio.sleep(0.2)


def account(
    msgs: Iterable[Msg], histories: dict[tuple[int, int, int], list[WireMessage]],
    members: dict[tuple[int, int, int], set[int]], peers: Iterable[Peer],
) -> dict[str, Any]:
    """Compare what was acknowledged with what is stored and what was pushed.

    ``histories``: every message of each conversation (by :func:`conv_key`); ``members``: who
    should receive a conversation's messages. Returns counts and, for what must never happen,
    the offending items (at most 20 each): ``lost`` (acknowledged, not stored with the
    acknowledged msg_id), ``duplicated_stored`` (one (sender, client_msg_id) stored twice),
    ``duplicated_delivered`` (one msg_id delivered twice to one connection), ``seq_gaps``
    (a conversation whose seqs are not 1..n)."""
    msgs = list(msgs)
    peers = list(peers)
    stored: dict[tuple[int, bytes], list[WireMessage]] = {}
    seq_gaps = []
    for key, hist in histories.items():
        if [w.seq for w in hist] != list(range(1, len(hist) + 1)):
            seq_gaps.append({"conversation": key, "seqs": [w.seq for w in hist][:50]})
        for w in hist:
            stored.setdefault((w.sender_id, w.client_msg_id), []).append(w)
    acked = [m for m in msgs if m.ack is not None]
    ours = {(m.sender.user_id, m.cmid) for m in msgs}
    lost = []
    for m in acked:
        assert m.ack is not None
        found = stored.get((m.sender.user_id, m.cmid), [])
        if m.ack.msg_id not in {x.msg_id for x in found}:
            lost.append({"sender": m.sender.name, "conversation": m.key, "cmid": m.cmid.hex(), "msg_id": m.ack.msg_id,
                         "stored_as": [x.msg_id for x in found]})
    duplicated_stored = [
        {"sender_id": s, "cmid": c.hex(), "msg_ids": [x.msg_id for x in xs]} for (s, c), xs in stored.items() if len(xs) > 1
    ]
    unacked_stored = sum(1 for m in msgs if m.ack is None and (m.sender.user_id, m.cmid) in stored)
    foreign = sum(1 for k in stored if k not in ours)
    # pushes
    acked_ids = {m.ack.msg_id: m for m in acked if m.ack is not None}
    due = 0
    for m in acked:
        due += len(members.get(m.key, set()) - {m.sender.user_id})
    pushed_pairs: set[tuple[int, int]] = set()
    pushes = 0
    duplicated_delivered = []
    out_of_order = 0
    for p in peers:
        for number, counter in p.delivers.items():
            for msg_id, n in counter.items():
                pushes += n
                if msg_id in acked_ids:
                    pushed_pairs.add((p.user_id, msg_id))
                if n > 1:
                    duplicated_delivered.append({"peer": p.name, "connection": number, "msg_id": msg_id, "times": n})
        for seqs in p.deliver_order.values():
            last: dict[tuple[int, int], int] = {}
            for kind, conv, seq in seqs:
                if seq <= last.get((kind, conv), 0):
                    out_of_order += 1
                last[(kind, conv)] = seq
    return {
        "messages": len(msgs),
        "acknowledged": len(acked),
        "unacknowledged": len(msgs) - len(acked),
        "duplicate_acks": sum(m.duplicate_acks for m in msgs),
        "stored": sum(len(xs) for xs in stored.values()),
        "stored_unacknowledged": unacked_stored,
        "stored_foreign": foreign,
        "lost": len(lost),
        "duplicated_stored": len(duplicated_stored),
        "duplicated_delivered": len(duplicated_delivered),
        "duplicated": len(duplicated_stored) + len(duplicated_delivered),
        "pushes_received": pushes,
        "pushes_due": due,
        "pushed_unique": len(pushed_pairs),
        "push_ratio": round(len(pushed_pairs) / due, 4) if due else None,
        "deliver_out_of_order": out_of_order,
        "seq_gaps": len(seq_gaps),
        "details": {
            "lost": lost[:20],
            "duplicated_stored": duplicated_stored[:20],
            "duplicated_delivered": duplicated_delivered[:20],
            "seq_gaps": seq_gaps[:20],
        },
    }


# ---- node observation ----------------------------------------------------------------------------
_METRIC = re.compile(r'^(gochat_breaker_state|gochat_degraded)\{(?:breaker|switch)="([a-z_]+)"\}\s+(\S+)$', re.M)
BREAKER_STATES = {0: "closed", 1: "open", 2: "half_open", 3: "forced_open", 4: "forced_closed"}


async def node_state(http: aiohttp.ClientSession, http_url: str, timeout: float = 3.0) -> dict[str, Any] | None:
    """Breaker states and degradation switches from the node's /metrics:
    ``{"breakers": {"postgres": "open", ...}, "degraded": {"read_only": 1, ...}}``; None when
    the node does not answer within ``timeout``."""
    try:
        async with http.get(f"{http_url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    breakers: dict[str, str] = {}
    degraded: dict[str, int] = {}
    for name, label, value in _METRIC.findall(text):
        if name == "gochat_breaker_state":
            breakers[label] = BREAKER_STATES.get(int(float(value)), value)
        else:
            degraded[label] = int(float(value))
    return {"breakers": breakers, "degraded": degraded}


class NodeProc:
    """A ``gochat serve`` process on free ports."""

    _LISTENING = re.compile(r"gochat listening ws=(\S+) http=(\S+)")

    def __init__(self, name: str, data: Path, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.data = data
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws_url = self.http_url = ""

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "GOCHAT_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as out:
            offset = out.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gochat.cli", "serve", "--data-dir", str(self.data), "--host", "127.0.0.1",
                 "--ws-port", "0", "--http-port", "0"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            m = self._LISTENING.search(text)
            if m:
                self.ws_url, self.http_url = m.group(1), m.group(2)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start within {timeout:g} s")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def create_user(http: aiohttp.ClientSession, http_url: str, name: str) -> tuple[int, str]:
    password = "chaos-password"
    async with http.post(f"{http_url}/v1/users", json={"username": name, "password": password}) as r:
        assert r.status == 201, await r.text()
        uid = int((await r.json())["user_id"])
    async with http.post(f"{http_url}/v1/auth/login", json={"username": name, "password": password}) as r:
        assert r.status == 200, await r.text()
        token = str((await r.json())["access_token"])
    return uid, token


async def drop_namespace(pg_dsn: str, schema: str, redis_url: str, prefix: str) -> None:
    import asyncpg
    import redis.asyncio as aioredis

    with contextlib.suppress(OSError, asyncpg.PostgresError):
        conn = await asyncpg.connect(pg_dsn, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    with contextlib.suppress(OSError, aioredis.RedisError):
        r = aioredis.Redis.from_url(redis_url)
        try:
            keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
            for i in range(0, len(keys), 1000):
                await r.delete(*keys[i:i + 1000])
        finally:
            await r.aclose()


@dataclass
class Traffic:
    """Continuous load: senders that create messages and send each until acknowledged
    (:func:`send_reliably`), readers that probe store-backed requests (:func:`probe`); every
    answer in :attr:`answers`, every message in :attr:`msgs`."""

    answers: Answers = field(default_factory=Answers)
    msgs: list[Msg] = field(default_factory=list)
    #: no new messages (the ones in flight are still retried)
    stop_sending: bool = False
    #: retries stop too (the run is over)
    give_up: bool = False
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def start_sender(self, peer: Peer, targets: list[tuple[int, int]], *, window: int = 4,
                     interval: float = 0.05) -> None:
        """``peer`` creates messages for ``targets`` ((kind, conv_id) in turn) every
        ``interval`` s on average, ``window`` of them unacknowledged at most."""
        self.tasks.append(asyncio.get_running_loop().create_task(self._sender(peer, targets, window, interval)))

    def start_retry(self, msg: Msg) -> None:
        """Send ``msg`` (already in :attr:`msgs`) until acknowledged, as the senders do."""
        self.tasks.append(asyncio.get_running_loop().create_task(
            send_reliably(msg, self.answers, give_up=lambda: self.give_up)))

    def start_reader(self, peer: Peer, kind: int, conv_id: int, every_s: float = 1.5, *,
                     concurrent: bool = False, presence_of: list[int] | None = None) -> None:
        """``peer`` probes store-backed reads (:func:`probe`) every ``every_s`` s on average:
        one after the other, or (``concurrent``) each on time whether or not the earlier ones
        were answered (up to 32 in flight), as many clients' requests are."""
        self.tasks.append(asyncio.get_running_loop().create_task(
            self._reader(peer, kind, conv_id, every_s, concurrent, presence_of)))

    async def _sender(self, peer: Peer, targets: list[tuple[int, int]], window: int, interval: float) -> None:
        slots = asyncio.Semaphore(window)
        pending: set[asyncio.Task[bool]] = set()
        for i in itertools.count():
            await slots.acquire()
            if self.stop_sending:
                slots.release()
                break
            kind, conv_id = targets[i % len(targets)]
            msg = Msg(peer, kind, conv_id, b"%s #%d" % (peer.name.encode(), i))
            self.msgs.append(msg)
            task = asyncio.get_running_loop().create_task(self._one(msg, slots))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, msg: Msg, slots: asyncio.Semaphore) -> bool:
        try:
            return await send_reliably(msg, self.answers, give_up=lambda: self.give_up)
        finally:
            slots.release()

    async def _reader(self, peer: Peer, kind: int, conv_id: int, every_s: float, concurrent: bool,
                      presence_of: list[int] | None) -> None:
        in_flight = asyncio.Semaphore(32 if concurrent else 1)
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            try:
                await probe(peer, self.answers, kind, conv_id, presence_of)
            finally:
                in_flight.release()

        while not self.stop_sending:
            await in_flight.acquire()
            task = asyncio.get_running_loop().create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(random.uniform(0.5, 1.5) * every_s)
        await asyncio.gather(*pending, return_exceptions=True)

    def acked_after(self, t: float) -> list[Msg]:
        return [m for m in self.msgs if m.acked_at is not None and m.acked_at >= t]

    async def first_ack_after(self, t: float, timeout: float) -> float | None:
        """Seconds from ``t`` to the first acknowledgement at or after ``t`` (waits up to
        ``timeout`` from now); None when there was none."""
        deadline = time.monotonic() + timeout
        while True:
            acks = [m.acked_at for m in self.acked_after(t) if m.acked_at is not None]
            if acks:
                return min(acks) - t
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)

    async def finish(self, timeout: float) -> float:
        """Stop creating messages, wait until every one is acknowledged (``timeout`` at most),
        then stop retrying; the seconds it took."""
        start = time.monotonic()
        self.stop_sending = True
        while time.monotonic() - start < timeout and any(m.ack is None for m in self.msgs):
            await asyncio.sleep(0.1)
        took = time.monotonic() - start
        self.give_up = True
        await asyncio.gather(*self.tasks, return_exceptions=True)
        return took


# ---- the soak --------------------------------------------------------------------------------------
FAULTS = ("latency", "drop", "dead", "blackhole", "flap")


@dataclass
class Soak:
    args: argparse.Namespace
    t0: float = field(default_factory=time.monotonic)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    traffic: Traffic = field(default_factory=Traffic)
    peers: list[Peer] = field(default_factory=list)
    nodes: list[NodeProc] = field(default_factory=list)

    def at(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def note(self, event: str, **info: Any) -> None:
        self.timeline.append({"t": self.at(), "event": event, **info})
        log(f"{event} {json.dumps(info, default=str)}")

    async def inject(self, proxies: dict[str, Any], rng: random.Random, until: float) -> None:
        """Random faults until ``until`` (monotonic): one at a time, on postgres, redis or both,
        each for 3–10 s, then a quiet gap of 2–6 s."""
        while time.monotonic() < until - 3:
            target = rng.choice(["postgres", "redis", "both"])
            fault = rng.choice(FAULTS)
            hold = min(rng.uniform(3, 10), max(1.0, until - time.monotonic()))
            names = ["postgres", "redis"] if target == "both" else [target]
            params: dict[str, Any] = {}
            if fault == "latency":
                params["one_way_s"] = round(rng.uniform(0.3, 1.2), 2)
            elif fault == "flap":
                params["period_s"] = round(rng.uniform(1.5, 4.0), 2)
            self.note("fault", backend=target, fault=fault, hold_s=round(hold, 1), **params)
            for n in names:
                self._apply(proxies[n], fault, params)
            end = time.monotonic() + hold
            while time.monotonic() < end:
                await asyncio.sleep(min(rng.uniform(0.5, 2.0), max(0.0, end - time.monotonic())))
                if fault == "drop" and time.monotonic() < end:
                    for n in names:
                        proxies[n].drop()
            for n in names:
                proxies[n].restore()
            self.note("clear", backend=target, fault=fault)
            await asyncio.sleep(min(rng.uniform(2, 6), max(0.0, until - time.monotonic())))

    @staticmethod
    def _apply(proxy: Any, fault: str, params: dict[str, Any]) -> None:
        if fault == "latency":
            proxy.delay(params["one_way_s"])
        elif fault == "drop":
            proxy.drop()
        elif fault == "dead":
            proxy.cut(reset=True)
        elif fault == "blackhole":
            proxy.cut()
        elif fault == "flap":
            proxy.flap(params["period_s"])

    async def watch(self, http: aiohttp.ClientSession) -> None:
        """Every 0.5 s: each node's breakers and switches (transitions into the timeline), and
        whether its process is alive."""
        last: dict[str, Any] = {}
        dead: set[str] = set()
        while True:
            for node in self.nodes:
                if not node.alive:
                    if node.name not in dead:
                        dead.add(node.name)
                        self.note("node_exited", node=node.name, code=node.proc.returncode if node.proc else None)
                    continue
                state = await node_state(http, node.http_url)
                if state is None:
                    state = {"metrics": "no answer within 3 s"}
                if state != last.get(node.name):
                    self.note("node_state", node=node.name, **state)
                    last[node.name] = state
            await asyncio.sleep(0.5)


async def soak(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from tests.tcpproxy import ProxyThread

    rng = random.Random(args.seed)
    work = out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    schema, prefix = f"chaos_{uuid.uuid4().hex[:10]}", f"gchaos:{uuid.uuid4().hex[:10]}:"
    threads = ProxyThread()
    pg = threads.add(*backend_address(args.postgres, 5432))
    rd = threads.add(*backend_address(args.redis, 6379))
    env = {
        "GOCHAT_REDIS_URL": proxied_url(args.redis, rd.port),
        "GOCHAT_POSTGRES_DSN": proxied_url(args.postgres, pg.port),
        "GOCHAT_POSTGRES_SCHEMA": schema,
        "GOCHAT_REDIS_PREFIX": prefix,
        "GOCHAT_REGISTRY_TTL_S": "3",
        "GOCHAT_REGISTRY_RENEW_S": "1",
        "GOCHAT_DRAIN_TIMEOUT_S": "5",
        "GOCHAT_ADMIN_TOKEN": ADMIN_TOKEN,
        "GOCHAT_RATE_LIMIT_PER_S": "100000",
        "GOCHAT_RATE_LIMIT_BURST": "100000",
        **FAST_BREAKERS,
    }
    s = Soak(args)
    s.nodes = [NodeProc(f"node{i}", work / "data", env, work / f"node{i}.log") for i in range(args.nodes)]
    watcher: asyncio.Task[None] | None = None
    try:
        for node in s.nodes:
            node.start()
        s.note("nodes_started", nodes=[n.ws_url for n in s.nodes])
        async with aiohttp.ClientSession() as http:
            tag = uuid.uuid4().hex[:6]
            users = [await create_user(http, s.nodes[i % args.nodes].http_url, f"chaos{tag}u{i}")
                     for i in range(args.senders)]
            s.peers = [Peer(f"u{i}", uid, tok, s.nodes[i % args.nodes].ws_url) for i, (uid, tok) in enumerate(users)]
            for p in s.peers:
                await p.connect()
            res = await s.peers[0].call("group.create", {"name": "chaos", "members": [u for u, _ in users[1:]]})
            assert isinstance(res, dict), res
            gid = int(res["group_id"])
            members: dict[tuple[int, int, int], set[int]] = {conv_key(Kind.GROUP, 0, gid): {u for u, _ in users}}
            targets: dict[str, list[tuple[int, int]]] = {}
            for i, p in enumerate(s.peers):
                peer_id = s.peers[(i + 1) % len(s.peers)].user_id
                targets[p.name] = [(Kind.DIRECT, peer_id), (Kind.GROUP, gid)]
                members[conv_key(Kind.DIRECT, p.user_id, peer_id)] = {p.user_id, peer_id}
            watcher = asyncio.get_running_loop().create_task(s.watch(http))
            s.note("load_started", senders=len(s.peers), window=args.window, interval_s=args.interval)
            traffic = s.traffic
            for p in s.peers:
                traffic.start_sender(p, targets[p.name], window=args.window, interval=args.interval)
            for p in s.peers[:2]:
                traffic.start_reader(p, Kind.GROUP, gid, concurrent=True, presence_of=[u for u, _ in users])
            await asyncio.sleep(min(3.0, args.duration / 10))  # a healthy start
            faults_end = time.monotonic() + args.duration
            await s.inject({"postgres": pg, "redis": rd}, rng, faults_end)
            pg.restore()
            rd.restore()
            cleared = time.monotonic()
            s.note("faults_cleared")
            first_ack = await traffic.first_ack_after(cleared, args.settle)
            s.note("sends_acknowledged_again", after_s=None if first_ack is None else round(first_ack, 2))
            await asyncio.sleep(args.tail)  # healthy traffic: are pushes back too?
            await traffic.finish(max(1.0, args.settle - (time.monotonic() - cleared)))
            # the messages created during the faults: all acknowledged how long after they cleared
            backlog = [m.acked_at for m in traffic.msgs if m.created < cleared and m.acked_at is not None]
            all_acked = max([*backlog, cleared]) - cleared
            s.note("settled", unacknowledged=sum(1 for m in traffic.msgs if m.ack is None),
                   backlog_acknowledged_after_s=round(all_acked, 2))
            await asyncio.sleep(2.0)  # the last pushes land
            histories = {}
            for key in members:
                kind, a, b = key
                if kind == Kind.GROUP:
                    reader, conv = s.peers[0], a
                else:
                    reader = next(p for p in s.peers if p.user_id == a)
                    conv = b
                histories[key] = await read_conversation(reader, kind, conv)
            final = {n.name: await node_state(http, n.http_url) for n in s.nodes if n.alive}
            acc = account(traffic.msgs, histories, members, s.peers)
            grace = cleared + OPEN_S + 1.0
            tail = account([m for m in traffic.msgs if m.created >= grace], histories, members, s.peers)
        crashed = [n.name for n in s.nodes if not n.alive]
        degraded_seen = Counter(v for p in s.peers for _, v in p.degraded)
        return {
            "nodes": args.nodes,
            "senders": args.senders,
            "duration_s": args.duration,
            "seed": args.seed,
            "settings": {k: v for k, v in env.items() if k.startswith("GOCHAT_BREAKER")},
            "accounting": acc,
            "answers": {
                "counts": dict(sorted(s.traffic.answers.counts.items())),
                "slowest_s": round(s.traffic.answers.slowest_s, 3),
                "bound_s": ANSWER_BOUND_S,
                "unanswered": [{"t": round(t - s.t0, 2), "request": w, "outcome": o, "s": round(d, 2)}
                               for t, w, o, d in s.traffic.answers.unanswered[:50]],
                "contract_violations": s.traffic.answers.bad[:50],
            },
            "recovery": {
                "first_ack_after_clear_s": None if first_ack is None else round(first_ack, 2),
                "tail_s": args.tail,
                "tail_acknowledged": tail["acknowledged"],
                "tail_push_ratio": tail["push_ratio"],
                "all_acknowledged_after_clear_s": round(all_acked, 2),
            },
            "degraded_events": {str(k): v for k, v in sorted(degraded_seen.items())},
            "reconnects": sum(p.lost_connections for p in s.peers),
            "crashed_nodes": crashed,
            "final_node_state": final,
            "faults": Counter(f"{e['backend']}:{e['fault']}" for e in s.timeline if e["event"] == "fault"),
            "timeline": s.timeline,
        }
    finally:
        if watcher is not None:
            watcher.cancel()
        for p in s.peers:
            p.close()
        pg.restore()
        rd.restore()
        for node in s.nodes:
            node.stop()
        await drop_namespace(args.postgres, schema, args.redis, prefix)
        threads.close()


def markdown(doc: dict[str, Any]) -> str:
    r = doc["results"]
    acc = r["accounting"]
    m = doc["machine"]
    verdict = "PASS" if doc["passed"] else "FAIL"
    breakers = ", ".join(f"{k.removeprefix('GOCHAT_BREAKER_').lower()}={v}" for k, v in r["settings"].items())
    rows = [
        ("messages created", acc["messages"]),
        ("acknowledged", acc["acknowledged"]),
        ("acknowledged as DUPLICATE (a retry of a stored one)", acc["duplicate_acks"]),
        ("never acknowledged (given up at the end)", acc["unacknowledged"]),
        ("stored", acc["stored"]),
        ("stored but never acknowledged", acc["stored_unacknowledged"]),
        ("**lost** (acknowledged, not stored)", acc["lost"]),
        ("**duplicated** stored (one client_msg_id twice)", acc["duplicated_stored"]),
        ("**duplicated** delivered (one msg_id twice to a connection)", acc["duplicated_delivered"]),
        ("pushes due (acknowledged × other members)", acc["pushes_due"]),
        ("pushed (distinct recipient, message)", f"{acc['pushed_unique']} ({(acc['push_ratio'] or 0) * 100:.1f} %)"),
        ("DELIVERs received", acc["pushes_received"]),
        ("DELIVERs out of seq order on a connection", acc["deliver_out_of_order"]),
        ("conversations with seq gaps", acc["seq_gaps"]),
        ("requests unanswered within the bound", len(r["answers"]["unanswered"])),
        ("slowest answer", f"{r['answers']['slowest_s']} s (bound {r['answers']['bound_s']} s)"),
        ("contract violations (non-retryable / no retry_after_ms)", len(r["answers"]["contract_violations"])),
        ("crashed nodes", ", ".join(r["crashed_nodes"]) or "none"),
        ("first SEND acknowledged after the faults cleared", f"{r['recovery']['first_ack_after_clear_s']} s"),
        ("every message created during the faults acknowledged, after they cleared",
         f"{r['recovery']['all_acknowledged_after_clear_s']} s"),
        (f"pushed, of the messages created from open_s + 1 s after the faults cleared ({r['recovery']['tail_s']:g} s "
         "of healthy traffic)",
         f"{(r['recovery']['tail_push_ratio'] or 0) * 100:.1f} % (of {r['recovery']['tail_acknowledged']} messages)"),
        ("connections lost and re-established", r["reconnects"]),
    ]
    lines = [
        f"# gochat bench: chaos — {verdict}",
        "",
        f"- command: `{doc['command']}`",
        f"- started: {doc['started']}, took {doc['elapsed_s']:.0f} s",
        f"- machine: {m['cpu_model']}, {m['cpus']} CPUs, Linux {m['kernel']}; gochat commit {m['git_commit']}",
        f"- {r['nodes']} nodes, {r['senders']} senders, faults for {r['duration_s']:g} s, seed {r['seed']}; "
        f"breakers: {breakers}",
        "",
        "## Accounting",
        "",
        "| what | count |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Answers to requests",
        "",
        "| outcome | count |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in r["answers"]["counts"].items()],
        "",
        "## Faults injected",
        "",
        "| backend:fault | times |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(r["faults"].items())],
        "",
        "## Timeline",
        "",
        "| t (s) | event | details |",
        "|---:|---|---|",
    ]
    for e in r["timeline"]:
        details = {k: v for k, v in e.items() if k not in ("t", "event")}
        lines.append(f"| {e['t']} | {e['event']} | `{json.dumps(details, default=str)}` |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of fault injection (default 180)")
    p.add_argument("--nodes", type=int, default=3, help="cluster nodes (default 3)")
    p.add_argument("--senders", type=int, default=8, help="users sending and receiving (default 8)")
    p.add_argument("--window", type=int, default=4, help="messages in flight per sender (default 4)")
    p.add_argument("--interval", type=float, default=0.05, help="mean seconds between a sender's new messages")
    p.add_argument("--settle", type=float, default=60.0,
                   help="after the faults: at most this long for every message to be acknowledged (default 60)")
    p.add_argument("--tail", type=float, default=8.0,
                   help="healthy traffic after the faults cleared, to see pushes recover (default 8)")
    p.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: random, reported)")
    p.add_argument("--postgres", default=PG_DSN, help="PostgreSQL DSN (GOCHAT_TEST_POSTGRES_DSN)")
    p.add_argument("--redis", default=REDIS_URL, help="Redis URL (GOCHAT_TEST_REDIS_URL)")
    p.add_argument("--out", type=Path, help="result directory")
    a = p.parse_args(argv)
    if a.duration <= 0 or a.nodes < 1 or a.senders < 2 or a.window < 1:
        p.error("--duration > 0, --nodes >= 1, --senders >= 2 and --window >= 1 are needed")
    if a.seed is None:
        a.seed = random.randrange(1 << 32)
    return a


def main(argv: list[str]) -> int:
    from bench import report
    from bench.procs import machine_facts

    a = parse(argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = (a.out or ROOT / "bench" / "results" / f"{stamp}-chaos").resolve()
    out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    t0 = time.monotonic()
    results = asyncio.run(soak(a, out))
    acc = results["accounting"]
    passed = acc["lost"] == 0 and acc["duplicated"] == 0 and not results["crashed_nodes"]
    doc = {
        "scenario": "chaos",
        "command": "python -m bench chaos " + " ".join(shlex.quote(x) for x in argv),
        "started": stamp,
        "elapsed_s": time.monotonic() - t0,
        "machine": facts,
        "passed": passed,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=report._json_default))
    (out / "results.md").write_text(markdown(doc))
    log(f"{'PASS' if passed else 'FAIL'}: acknowledged {acc['acknowledged']}, stored {acc['stored']}, lost {acc['lost']}, "
        f"duplicated {acc['duplicated']}, pushed {acc['pushed_unique']}/{acc['pushes_due']}; {out / 'results.md'}")
    print(out / "results.json")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
