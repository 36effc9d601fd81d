"""End-to-end tests of :mod:`gochat.client` and ``gochat chat`` against a real ``gochat serve``.

What is checked is what an application sees: every message exactly once and in order per
conversation across SIGKILL + restart, drains (GOAWAY 502) and forced logouts (GOAWAY 202);
unacknowledged sends resolved with their original ack; DELIVER gaps filled from HISTORY.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from gochat.client import (
    AuthError,
    Client,
    ErrorCode,
    Event,
    EventType,
    HttpApi,
    Kind,
    Message,
    RequestError,
)
from gochat.protocol import frames as F
from tests.conftest import GochatProcess, UserCtx
from tests.e2e.rawclient import connect as raw_connect

pytestmark = pytest.mark.e2e

T = TypeVar("T")
MakeUser = Callable[[str], Awaitable[UserCtx]]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _connect(server: GochatProcess, token: Any, **kw: Any) -> Coroutine[Any, Any, Client]:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.5)
    kw.setdefault("request_timeout", 10.0)
    return Client.connect(server.ws_url, token, **kw)


async def messages(c: Client, n: int, timeout: float = 10.0) -> list[Message]:
    """The next ``n`` messages of the stream (events skipped)."""
    out: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(out) < n:
        item = await c.next_event(max(deadline - loop.time(), 0.01))
        if isinstance(item, Message):
            out.append(item)
    return out


async def no_more_messages(c: Client, within: float = 0.5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            item = await c.next_event(max(deadline - loop.time(), 0.001))
        except TimeoutError:
            return
        assert not isinstance(item, Message), f"unexpected message {item!r}"


async def eventually(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------


def test_multi_device_delivery_and_groups(gochat_server: GochatProcess, make_user: MakeUser) -> None:
    async def body() -> None:
        alice, bob, carol = await make_user("alice"), await make_user("bob"), await make_user("carol")
        a1 = await _connect(gochat_server, alice.access_token)
        a2 = await _connect(gochat_server, alice.access_token)
        b = await _connect(gochat_server, bob.access_token)
        c = await _connect(gochat_server, carol.access_token)
        try:
            assert a1.user_id == a2.user_id == alice.user_id and a1.session_id != a2.session_id
            ack = await a1.send(Kind.DIRECT, bob.user_id, "hi bob")
            assert ack.seq == 1 and not ack.duplicate
            [mb] = await messages(b, 1)
            assert (mb.kind, mb.conv_id, mb.seq, mb.sender_id, mb.text) == (
                Kind.DIRECT, alice.user_id, 1, alice.user_id, "hi bob")
            assert mb.client_msg_id == ack.client_msg_id and mb.msg_id == ack.msg_id
            [ma2] = await messages(a2, 1)  # alice's other device, from her side of the conversation
            assert (ma2.conv_id, ma2.seq, ma2.text) == (bob.user_id, 1, "hi bob")
            await no_more_messages(a1, 0.3)  # the sending connection gets no DELIVER of its own

            ack2 = await b.send(Kind.DIRECT, alice.user_id, b'{"n": 2}', content_type=2)
            assert ack2.seq == 2
            for dev in (a1, a2):
                [m] = await messages(dev, 1)
                assert (m.conv_id, m.seq, m.sender_id, m.json()) == (bob.user_id, 2, bob.user_id, {"n": 2})

            g = await a1.call("group.create", {"name": "trio", "members": [bob.user_id, carol.user_id]})
            gid = int(g["group_id"])
            assert set(g["members"]) == {alice.user_id, bob.user_id, carol.user_id}
            assert (await b.call("user.lookup", {"username": carol.username}))["user_id"] == carol.user_id
            for i in range(5):
                await a1.send(Kind.GROUP, gid, f"g{i}")
            for dev in (a2, b, c):
                got = await messages(dev, 5)
                assert [(m.kind, m.conv_id, m.seq, m.text) for m in got] == [
                    (Kind.GROUP, gid, i + 1, f"g{i}") for i in range(5)]
            # membership events reached bob and carol in the stream
            convs = (await c.call("conversation.list"))["conversations"]
            assert any(x["kind"] == Kind.GROUP and x["conv_id"] == gid and x["last_seq"] == 5 for x in convs)
            with pytest.raises(RequestError) as e:
                await c.send(Kind.GROUP, gid + 999_999, "nope")
            assert e.value.code in (ErrorCode.NOT_MEMBER, ErrorCode.NOT_FOUND)
            page = await c.history(Kind.GROUP, gid, 1, 2)
            assert [m.seq for m in page.messages] == [1, 2] and page.more
            assert [m.text for m in await c.fetch_all(Kind.GROUP, gid, 0, page=2)] == [f"g{i}" for i in range(5)]
            await c.read(Kind.GROUP, gid, 5)
            read_events = []
            while True:
                item = await b.next_event(5)
                if isinstance(item, Event) and item.type == EventType.READ:
                    read_events.append(item)
                    break
            assert (read_events[0].actor_id, read_events[0].value) == (carol.user_id, 5)
            assert await a1.ping() < 5
        finally:
            for cl in (a1, a2, b, c):
                await cl.close()

    run(body())


def test_reconnect_after_sigkill_and_restart_no_loss_no_duplicates(
    gochat_server: GochatProcess, make_user: MakeUser
) -> None:
    async def body() -> None:
        alice, bob = await make_user("alice"), await make_user("bob")
        a = await _connect(gochat_server, alice.access_token)
        b = await _connect(gochat_server, bob.access_token)
        states: list[str] = []
        a2 = await _connect(gochat_server, alice.access_token, on_state=states.append)
        n = 60
        try:

            async def sender() -> list[int]:
                seqs = []
                for i in range(n):
                    seqs.append((await b.send(Kind.DIRECT, alice.user_id, f"m{i}")).seq)
                    await asyncio.sleep(0.01)
                return seqs

            task = asyncio.create_task(sender())
            await asyncio.sleep(0.25)
            await asyncio.to_thread(gochat_server.restart)  # SIGKILL, then a fresh process
            seqs = await asyncio.wait_for(task, 60)
            assert seqs == list(range(1, n + 1))
            for dev in (a, a2):
                got = await messages(dev, n, 30)
                assert [m.text for m in got] == [f"m{i}" for i in range(n)]
                assert [m.seq for m in got] == list(range(1, n + 1))
                await no_more_messages(dev)
            assert "disconnected" in states
            # the store has each message once
            stored = await a.fetch_all(Kind.DIRECT, bob.user_id, 0)
            assert [m.text for m in stored] == [f"m{i}" for i in range(n)]
            # alice can talk again on the new process
            assert (await a.send(Kind.DIRECT, bob.user_id, "back")).seq == n + 1
            [m] = await messages(b, 1)
            assert m.text == "back"
        finally:
            for cl in (a, a2, b):
                await cl.close()

    run(body())


def test_unacked_sends_resent_with_same_client_msg_id(gochat_server: GochatProcess, make_user: MakeUser) -> None:
    async def body() -> None:
        alice, bob = await make_user("alice"), await make_user("bob")
        # a SEND stored by the server whose ack the sender never read (it went away)
        cmid = uuid.uuid4().bytes
        raw = await raw_connect(gochat_server.ws_url, alice.access_token)
        await raw.expect(F.AuthOk)
        raw.send(F.Send(Kind.DIRECT, 1, bob.user_id, cmid, b"first try", rid=1))
        first = await raw.expect(F.SendAck)
        assert raw.transport is not None
        raw.transport.disconnect()

        a = await _connect(gochat_server, alice.access_token)
        b = await _connect(gochat_server, bob.access_token)
        try:
            ack = await a.send(Kind.DIRECT, bob.user_id, "first try", client_msg_id=cmid)
            assert ack.duplicate and (ack.seq, ack.msg_id, ack.ts_ms) == (first.seq, first.msg_id, first.ts_ms)
            await no_more_messages(b, 0.3)  # a duplicate is not delivered again

            # sends made while the server is down wait in the outbox and go out after restart
            await asyncio.to_thread(gochat_server.kill)
            await eventually(lambda: not a.connected)
            cmids = [uuid.uuid4().bytes for _ in range(3)]
            tasks = [asyncio.create_task(a.send(Kind.DIRECT, bob.user_id, f"queued{i}", client_msg_id=cmids[i]))
                     for i in range(3)]
            await asyncio.sleep(0.3)
            assert a.unacknowledged == 3
            await asyncio.to_thread(gochat_server.start)
            acks = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert [x.seq for x in acks] == [2, 3, 4]
            assert [x.client_msg_id for x in acks] == cmids
            got = await messages(b, 3, 15)
            assert [(m.seq, m.text, m.client_msg_id) for m in got] == [
                (2 + i, f"queued{i}", cmids[i]) for i in range(3)]
            stored = await b.fetch_all(Kind.DIRECT, alice.user_id, 0)
            assert [m.client_msg_id for m in stored] == [cmid, *cmids]
        finally:
            await a.close()
            await b.close()

    run(body())


def test_deliver_gap_filled_from_history_and_offline_catch_up(
    gochat_server: GochatProcess, make_user: MakeUser
) -> None:
    async def body() -> None:
        alice, bob = await make_user("alice"), await make_user("bob")
        a = await _connect(gochat_server, alice.access_token, gap_fill_delay=0.05)
        b = await _connect(gochat_server, bob.access_token)
        try:
            # lose DELIVER seq 2 on alice's side: the client sees 3 > 1 + 1 and fetches the gap
            original = a._on_frame
            dropped: list[Any] = []

            def lossy(conn: Any, f: Any) -> None:
                if isinstance(f, F.Deliver) and f.message.seq == 2 and not dropped:
                    dropped.append(f)
                    return
                original(conn, f)

            a._on_frame = lossy  # type: ignore[method-assign]
            for i in range(1, 5):
                await b.send(Kind.DIRECT, alice.user_id, f"d{i}")
            got = await messages(a, 4)
            assert dropped and [(m.seq, m.text) for m in got] == [(i, f"d{i}") for i in range(1, 5)]
            await no_more_messages(a)

            # offline catch-up: a later session resumes from saved positions
            saved = a.positions()
            assert saved[(Kind.DIRECT, bob.user_id)] == 4
            await a.close()
            for i in range(5, 8):
                await b.send(Kind.DIRECT, alice.user_id, f"d{i}")
            fresh = await _connect(gochat_server, alice.access_token)  # no resume: history only
            resumed = await _connect(gochat_server, alice.access_token, resume=saved)
            got = await messages(resumed, 3)
            assert [(m.seq, m.text) for m in got] == [(i, f"d{i}") for i in range(5, 8)]
            await no_more_messages(resumed)
            await no_more_messages(fresh, 0.3)
            # explicit sync from a known position re-emits what came after it
            states = await fresh.sync({(Kind.DIRECT, bob.user_id): 6})
            assert [(s.kind, s.conv_id, s.last_seq) for s in states] == [(Kind.DIRECT, bob.user_id, 7)]
            [m] = await messages(fresh, 1)
            assert m.seq == 7
            await fresh.close()
            await resumed.close()
        finally:
            await a.close()
            await b.close()

    run(body())


def test_goaway_drain_reconnects_and_resumes(gochat_server: GochatProcess, make_user: MakeUser) -> None:
    async def body() -> None:
        alice, bob = await make_user("alice"), await make_user("bob")
        a = await _connect(gochat_server, alice.access_token)
        b = await _connect(gochat_server, bob.access_token)
        try:
            await b.send(Kind.DIRECT, alice.user_id, "before")
            [m] = await messages(a, 1)
            assert m.text == "before"
            code = await asyncio.to_thread(gochat_server.terminate)  # SIGTERM: GOAWAY 502, drain
            assert code == 0
            await eventually(lambda: a.last_goaway is not None and not a.connected)
            ga = a.last_goaway
            assert ga is not None and ga.code == ErrorCode.SHUTTING_DOWN
            pending = asyncio.create_task(b.send(Kind.DIRECT, alice.user_id, "during restart"))
            await asyncio.to_thread(gochat_server.start)
            ack = await asyncio.wait_for(pending, 30)
            assert ack.seq == 2
            [m] = await messages(a, 1, 20)
            assert (m.seq, m.text) == (2, "during restart")
            await no_more_messages(a)
        finally:
            await a.close()
            await b.close()

    run(body())


def test_forced_logout_goaway(gochat_server: GochatProcess, make_user: MakeUser) -> None:
    async def body() -> None:
        alice = await make_user("alice")
        async with HttpApi(gochat_server.http_url) as api:
            tokens = api.token_source(alice.username, alice.password)
            refreshing = await _connect(gochat_server, tokens)
            static = await _connect(gochat_server, alice.access_token)
            try:
                # logging out the fixture's session: the static-token client is told GOAWAY 202
                # and gives up, the other session is untouched
                await api.logout(alice.access_token, alice.refresh_token)
                with pytest.raises(AuthError) as e:
                    while True:
                        await static.next_event(10)
                assert e.value.code in (ErrorCode.TOKEN_REVOKED, ErrorCode.UNAUTHORIZED)
                assert static.closed
                assert refreshing.connected

                # logging out the token source's session: it logs in again and carries on
                s1 = refreshing.session_id
                await tokens.logout()
                await eventually(lambda: refreshing.session_id != s1 and refreshing.connected, 20)
                assert not refreshing.closed
                assert (await refreshing.send(Kind.DIRECT, alice.user_id, "note to self")).seq == 1
            finally:
                await refreshing.close()
                await static.close()

    run(body())


def test_rooms_survive_reconnect(gochat_server: GochatProcess, make_user: MakeUser) -> None:
    async def body() -> None:
        alice, bob = await make_user("alice"), await make_user("bob")
        a = await _connect(gochat_server, alice.access_token)
        b = await _connect(gochat_server, bob.access_token)
        try:
            await a.subscribe(4242)
            await b.subscribe(4242)
            ack = await a.send(Kind.ROOM, 4242, "room hello")
            assert ack.seq == 0 and ack.msg_id
            [m] = await messages(b, 1)
            assert (m.kind, m.conv_id, m.seq, m.text) == (Kind.ROOM, 4242, 0, "room hello")
            sb = b.session_id
            await asyncio.to_thread(gochat_server.restart)
            await eventually(lambda: b.connected and b.session_id != sb and a.connected, 30)
            await asyncio.sleep(0.2)  # the re-SUBSCRIBE is in flight with the reconnect
            await a.send(Kind.ROOM, 4242, "after restart")
            [m] = await messages(b, 1)
            assert m.text == "after restart"
        finally:
            await a.close()
            await b.close()

    run(body())


# ---------------------------------------------------------------------------------------------
# gochat chat
# ---------------------------------------------------------------------------------------------


async def _chat_proc(server: GochatProcess, user: str, password: str, *extra: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gochat.cli", "chat", "--server", server.http_url, "--ws", server.ws_url,
        "--user", user, "--password", password, *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def _read_until(proc: asyncio.subprocess.Process, pattern: str, timeout: float = 15.0) -> str:
    assert proc.stdout is not None
    rx = re.compile(pattern)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while True:
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), max(deadline - loop.time(), 0.01))
        except TimeoutError:
            raise AssertionError(f"{pattern!r} not seen; output so far: {seen}") from None
        if not raw:
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"{pattern!r} not seen before EOF; output: {seen}; stderr: {err!r}")
        line = raw.decode().rstrip("\n")
        seen.append(line)
        if rx.search(line):
            return line


def test_chat_cli_over_pipes(gochat_server: GochatProcess, make_user: MakeUser) -> None:
    async def body() -> None:
        alice, bob = await make_user("alice"), await make_user("bob")
        b = await _connect(gochat_server, bob.access_token)
        proc = await _chat_proc(gochat_server, alice.username, alice.password)
        assert proc.stdin is not None
        try:
            await _read_until(proc, r"^\* connected as ")
            proc.stdin.write(f"/to {bob.username}\nhello bob\n".encode())
            await proc.stdin.drain()
            await _read_until(proc, rf"^\[\d\d:\d\d:\d\d\] you → {re.escape(bob.username)}: hello bob$")
            [m] = await messages(b, 1)
            assert (m.sender_id, m.text) == (alice.user_id, "hello bob")
            await b.send(Kind.DIRECT, alice.user_id, "hi alice")
            await _read_until(proc, rf"^\[\d\d:\d\d:\d\d\] {re.escape(bob.username)} → you: hi alice$")
            proc.stdin.write(f"/group club {bob.username}\nwelcome\n/history 5\n".encode())
            await proc.stdin.drain()
            await _read_until(proc, r"^\* created group #club \(\d+\)$")
            [m] = await messages(b, 1)
            assert (m.kind, m.text) == (Kind.GROUP, "welcome")
            await _read_until(proc, r"you → #club: welcome$")  # the ack line
            await _read_until(proc, r"you → #club: welcome$")  # /history
            proc.stdin.write(b"/quit\n")
            await proc.stdin.drain()
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await b.close()

    run(body())


def test_chat_cli_register_and_end_of_input(gochat_server: GochatProcess, make_user: MakeUser) -> None:
    async def body() -> None:
        bob = await make_user("bob")
        b = await _connect(gochat_server, bob.access_token)
        name = f"newbie{os.getpid()}x{uuid.uuid4().hex[:6]}"
        try:
            proc = await _chat_proc(gochat_server, name, "pw-123456", "--register", "--to", bob.username)
            out, err = await asyncio.wait_for(proc.communicate(b"first message\n"), 30)
            assert proc.returncode == 0, err.decode()
            assert re.search(rf"you → {re.escape(bob.username)}: first message", out.decode()), out.decode()
            [m] = await messages(b, 1)
            assert m.text == "first message"
            # --register again with an existing account is fine
            proc = await _chat_proc(gochat_server, name, "pw-123456", "--register")
            out, err = await asyncio.wait_for(proc.communicate(b"/quit\n"), 30)
            assert proc.returncode == 0, err.decode()
        finally:
            await b.close()

    run(body())
