"""``gochat chat`` names the sender of an incoming message: never a bare user id.

The session is driven directly (its receive loop writing into a buffer) against a real
``gochat serve`` (which answers ``user.get``); a stub client covers a server with and without it.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gochat.cli_chat import ChatSession
from gochat.client import Client, GochatError, HttpApi, Kind, Message
from gochat.errors import ErrorCode
from tests.conftest import GochatProcess, UserCtx

MakeUser = Callable[[str], Awaitable[UserCtx]]
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (.+?) → (.+?): (.*)$")


async def _line(out: io.StringIO, text: str, timeout: float = 10.0) -> re.Match[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for line in out.getvalue().splitlines():
            m = LINE.match(line)
            if m and m.group(3) == text:
                return m
        assert loop.time() < deadline, f"{text!r} not shown: {out.getvalue()!r}"
        await asyncio.sleep(0.02)


@pytest.mark.e2e
def test_first_message_from_an_unknown_user_shows_a_name_not_a_bare_id(
    gochat_server: GochatProcess, make_user: MakeUser
) -> None:
    async def body() -> None:
        alice, bob = await make_user("alice"), await make_user("bob")
        a = await Client.connect(gochat_server.ws_url, alice.access_token)
        b = await Client.connect(gochat_server.ws_url, bob.access_token)
        api = HttpApi(gochat_server.http_url)
        out, err = io.StringIO(), io.StringIO()
        session = ChatSession(b, api, bob.username, out=out, err=err)
        rx = asyncio.create_task(session.receive())
        try:
            # bob never looked alice up: her first message
            await a.send(Kind.DIRECT, bob.user_id, "hi bob")
            m = await _line(out, "hi bob")
            sender, dest = m.group(1), m.group(2)
            assert dest == "you"
            assert sender != str(alice.user_id), m.group(0)
            # her name, which the server tells (CALL user.get)
            assert session.user_get is True, out.getvalue()
            assert sender == alice.username, m.group(0)
            # once the name is known (/to NAME looks it up), every later line uses it
            assert await session.handle(f"/to {alice.username}")
            await a.send(Kind.DIRECT, bob.user_id, "again")
            m = await _line(out, "again")
            assert (m.group(1), m.group(2)) == (alice.username, "you"), m.group(0)
            # and a group message from her is shown with her name too
            res = await a.call("group.create", {"name": "club", "members": [bob.user_id]})
            await a.send(Kind.GROUP, int(res["group_id"]), "club hello")
            m = await _line(out, "club hello")
            assert (m.group(1), m.group(2)) == (alice.username, "#club"), m.group(0)
        finally:
            rx.cancel()
            await asyncio.gather(rx, return_exceptions=True)
            await a.close()
            await b.close()
            await api.close()

    asyncio.run(body())


class _StubClient:
    """Just what ChatSession.resolve_user and format_message use, with a server that
    answers ``user.get`` (or not)."""

    def __init__(self, user_id: int, names: dict[int, str] | None) -> None:
        self.user_id = user_id
        self.names = names
        self.calls: list[tuple[str, Any]] = []

    async def call(self, method: str, payload: Any = None, *, timeout: float | None = None) -> dict[str, Any]:
        self.calls.append((method, payload))
        if self.names is None:
            raise GochatError("unknown method", code=ErrorCode.UNKNOWN_METHOD)
        uid = payload["user_id"]
        if uid not in self.names:
            raise GochatError("no such user", code=ErrorCode.NOT_FOUND)
        return {"user_id": uid, "username": self.names[uid]}


def _direct(sender: int, conv: int, text: str) -> Message:
    return Message(Kind.DIRECT, conv, 1, 1, sender, 0, b"\0" * 16, 1, text.encode())


@pytest.mark.parametrize("supported", [True, False])
def test_sender_resolved_through_user_get_when_the_server_has_it(supported: bool) -> None:
    async def body() -> None:
        client = _StubClient(2, {1: "alice"} if supported else None)
        session = ChatSession(client, None, "bob", out=io.StringIO(), err=io.StringIO())  # type: ignore[arg-type]
        for _ in range(2):
            await session.resolve_user(1)
        line = session.format_message(_direct(1, 1, "hi"))
        assert line.endswith(("alice" if supported else "user#1") + " → you: hi"), line
        # asked once: a known name is cached, a server without the method is not asked again
        assert client.calls == [("user.get", {"user_id": 1})]

    asyncio.run(body())
