"""``gochat chat``: a small line-oriented terminal client.

Reads commands and messages from stdin (a terminal or a pipe) and prints incoming messages as
``[HH:MM:SS] alice → you: text``. Commands::

    /to NAME                 talk to user NAME (direct conversation)
    /group NAME USER...      create group NAME with the given members and talk there
    /in GROUP                talk in an existing group (name or id)
    /join-room ID            subscribe to room ID and talk there
    /leave-room ID           unsubscribe from room ID
    /history [N]             the last N (default 20) messages of the current conversation
    /list                    your conversations
    /help                    this text
    /quit                    leave (so does end of input)

Any other line is sent as a text message to the current conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
import threading
import time
from typing import Any, TextIO

from gochat.client import (
    NEWEST,
    Client,
    ContentType,
    Event,
    EventType,
    GochatError,
    HttpApi,
    Kind,
    Message,
)
from gochat.errors import ErrorCode

__all__ = ["ChatSession", "add_chat_arguments", "chat_main", "run_chat"]

DEFAULT_HTTP = "http://127.0.0.1:8701"
DEFAULT_WS = "ws://127.0.0.1:8700/ws"

HELP = """commands:
  /to NAME               talk to user NAME
  /group NAME USER...    create a group with these members and talk there
  /in GROUP              talk in an existing group (name or id)
  /join-room ID          subscribe to a room and talk there
  /leave-room ID         unsubscribe from a room
  /history [N]           last N messages of the current conversation (default 20)
  /list                  your conversations
  /quit                  leave
anything else is sent to the current conversation"""


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``gochat chat`` options on ``parser``."""
    parser.add_argument("--server", default=os.environ.get("GOCHAT_SERVER", DEFAULT_HTTP),
                        metavar="URL", help=f"HTTP API base URL (default {DEFAULT_HTTP})")
    parser.add_argument("--ws", action="append", metavar="URL",
                        help=f"WebSocket URL; repeat for fail-over (default {DEFAULT_WS})")
    parser.add_argument("--user", required=True, help="username")
    parser.add_argument("--password",
                        help="password (default: $GOCHAT_PASSWORD, else asked on the terminal)")
    parser.add_argument("--register", action="store_true",
                        help="create the account first (an existing one is fine)")
    parser.add_argument("--to", metavar="NAME", help="start in a direct conversation with NAME")


class _StdinReader:
    """Lines from a text stream, read by a daemon thread (works for ttys, pipes and files,
    and never blocks interpreter exit)."""

    def __init__(self, stream: TextIO) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._stream = stream
        threading.Thread(target=self._pump, name="gochat-chat-stdin", daemon=True).start()

    def _pump(self) -> None:
        try:
            for line in self._stream:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
        except (OSError, ValueError, RuntimeError):
            pass
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    async def readline(self) -> str | None:
        """The next line without its newline, or None at end of input."""
        line = await self._queue.get()
        if line is None:
            self._queue.put_nowait(None)
            return None
        return line.rstrip("\r\n")


class ChatSession:
    """The chat loop: commands from input lines, incoming messages to ``out``."""

    def __init__(self, client: Client, api: HttpApi, username: str, *,
                 out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.client = client
        self.api = api
        self.username = username
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.names: dict[int, str] = {client.user_id: username}
        self.ids: dict[str, int] = {username: client.user_id}
        self.groups: dict[int, str] = {}
        self.target: tuple[int, int] | None = None
        #: whether the server answers CALL ``user.get`` (id -> name); None until first asked
        self.user_get: bool | None = None

    # -- output ----------------------------------------------------------------------------

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def warn(self, line: str) -> None:
        print(f"! {line}", file=self.err, flush=True)

    def user_label(self, user_id: int) -> str:
        """The user's name when known (looked up, listed, or resolved by :meth:`resolve_user`),
        else ``user#ID``: never a bare number that reads like part of the message."""
        if user_id == self.client.user_id:
            return "you"
        name = self.names.get(user_id)
        return name if name is not None else f"user#{user_id}"

    def conv_label(self, kind: int, conv_id: int) -> str:
        if kind == Kind.DIRECT:
            return self.user_label(conv_id)
        if kind == Kind.GROUP:
            return "#" + self.groups.get(conv_id, str(conv_id))
        return f"room:{conv_id}"

    @staticmethod
    def clock(ts_ms: int) -> str:
        return time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000))

    @staticmethod
    def body_text(content_type: int, body: bytes) -> str:
        if content_type in (ContentType.TEXT, ContentType.JSON):
            return body.decode("utf-8", "replace")
        return f"<{len(body)} bytes, content type {content_type}>"

    def format_message(self, m: Message) -> str:
        sender = self.user_label(m.sender_id)
        if m.kind == Kind.DIRECT:
            dest = "you" if m.sender_id != self.client.user_id else self.user_label(m.conv_id)
        else:
            dest = self.conv_label(m.kind, m.conv_id)
        return f"[{self.clock(m.ts_ms)}] {sender} → {dest}: {self.body_text(m.content_type, m.body)}"

    def format_event(self, e: Event) -> str | None:
        who = self.user_label(e.actor_id)
        if e.type == EventType.PRESENCE:
            return f"* {who} is {'online' if e.value else 'offline'}"
        if e.type == EventType.MEMBER_ADDED:
            return f"* {who} added {self.user_label(e.value)} to {self.conv_label(e.kind, e.conv_id)}"
        if e.type == EventType.MEMBER_REMOVED:
            where = self.conv_label(e.kind, e.conv_id)
            if e.actor_id == e.value:
                return f"* {who} left {where}"
            return f"* {who} removed {self.user_label(e.value)} from {where}"
        if e.type == EventType.CONVERSATION_UPDATED:
            name = e.json().get("name") if e.extra else None
            if isinstance(name, str) and e.kind == Kind.GROUP:
                self.groups[e.conv_id] = name
            return f"* {who} updated {self.conv_label(e.kind, e.conv_id)}"
        return None  # typing, read receipts, application events: not shown

    # -- lookups -----------------------------------------------------------------------------

    async def lookup(self, name: str) -> int:
        if name in self.ids:
            return self.ids[name]
        try:
            uid = int((await self.client.call("user.lookup", {"username": name}))["user_id"])
        except GochatError as e:
            if e.code != ErrorCode.UNKNOWN_METHOD:
                raise
            uid = await self.api.lookup_user(name)
        self.ids[name] = uid
        self.names[uid] = name
        return uid

    async def resolve_user(self, user_id: int) -> None:
        """Learn the name of ``user_id`` before it is shown, with CALL ``user.get`` (id -> name).
        A server without that method (an older one) answers UNKNOWN_METHOD once; from then on
        the user is shown as ``user#ID`` until the name is learnt another way (``/to NAME``,
        ``/group``, ``/list``)."""
        if user_id <= 0 or user_id == self.client.user_id or user_id in self.names or self.user_get is False:
            return
        try:
            res = await self.client.call("user.get", {"user_id": user_id}, timeout=5.0)
        except GochatError as e:
            if e.code == ErrorCode.UNKNOWN_METHOD:
                self.user_get = False
            return
        except TimeoutError:
            return
        self.user_get = True
        name = res.get("username")
        if isinstance(name, str) and name:
            self.names[user_id] = name
            self.ids.setdefault(name, user_id)

    async def load_conversations(self) -> list[dict[str, Any]]:
        convs: list[dict[str, Any]] = (await self.client.call("conversation.list")).get("conversations", [])
        for c in convs:
            name = c.get("name")
            if not name:
                continue
            if c.get("kind") == Kind.GROUP:
                self.groups[int(c["conv_id"])] = str(name)
            elif c.get("kind") == Kind.DIRECT:
                self.names.setdefault(int(c["conv_id"]), str(name))
                self.ids.setdefault(str(name), int(c["conv_id"]))
        return convs

    async def group_name(self, group_id: int) -> None:
        if group_id in self.groups:
            return
        with contextlib.suppress(GochatError, KeyError, TypeError, ValueError):
            info = await self.client.call("group.info", {"group_id": group_id})
            self.groups[group_id] = str(info["name"])

    # -- loops -------------------------------------------------------------------------------

    async def receive(self) -> None:
        """Print the event stream until the client closes."""
        async for item in self.client:
            if isinstance(item, Message):
                await self.resolve_user(item.sender_id)
                if item.kind == Kind.GROUP:
                    await self.group_name(item.conv_id)
                elif item.kind == Kind.DIRECT:
                    await self.resolve_user(item.conv_id)  # the peer (a message from my other device)
                self.say(self.format_message(item))
            else:
                await self.resolve_user(item.actor_id)
                if item.type in (EventType.MEMBER_ADDED, EventType.MEMBER_REMOVED):
                    await self.resolve_user(item.value)
                line = self.format_event(item)
                if line:
                    self.say(line)

    async def handle(self, line: str) -> bool:
        """Process one input line; False means quit."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/") or line.startswith("//"):
            await self.send_text(line[1:] if line.startswith("//") else line)
            return True
        cmd, *args = line.split()
        try:
            return await self.command(cmd.lower(), args)
        except GochatError as e:
            self.warn(f"{cmd}: {e.message} ({e.code.name})")
        except (KeyError, TypeError, ValueError) as e:
            self.warn(f"{cmd}: {e}")
        except TimeoutError:
            self.warn(f"{cmd}: timed out")
        return True

    async def command(self, cmd: str, args: list[str]) -> bool:
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/to" and len(args) == 1:
            uid = await self.lookup(args[0])
            self.target = (Kind.DIRECT, uid)
            self.say(f"* talking to {args[0]}")
        elif cmd == "/group" and len(args) >= 1:
            members = [await self.lookup(n) for n in args[1:]]
            res = await self.client.call("group.create", {"name": args[0], "members": members})
            gid = int(res["group_id"])
            self.groups[gid] = str(res.get("name", args[0]))
            self.target = (Kind.GROUP, gid)
            self.say(f"* created group #{self.groups[gid]} ({gid})")
        elif cmd == "/in" and len(args) == 1:
            gid = await self.find_group(args[0])
            self.target = (Kind.GROUP, gid)
            self.say(f"* talking in #{self.groups.get(gid, gid)}")
        elif cmd == "/join-room" and len(args) == 1:
            room = int(args[0])
            await self.client.subscribe(room)
            self.target = (Kind.ROOM, room)
            self.say(f"* joined room:{room}")
        elif cmd == "/leave-room" and len(args) == 1:
            room = int(args[0])
            await self.client.unsubscribe(room)
            if self.target == (Kind.ROOM, room):
                self.target = None
            self.say(f"* left room:{room}")
        elif cmd == "/history" and len(args) <= 1:
            await self.history(int(args[0]) if args else 20)
        elif cmd == "/list" and not args:
            for c in await self.load_conversations():
                label = self.conv_label(int(c["kind"]), int(c["conv_id"]))
                self.say(f"* {label}: last {c.get('last_seq', 0)}, read {c.get('read_seq', 0)}")
        else:
            self.warn(f"unknown command or wrong arguments: {cmd} {' '.join(args)} (try /help)")
        return True

    async def find_group(self, ref: str) -> int:
        if ref.lstrip("#").isdigit():
            return int(ref.lstrip("#"))
        name = ref.lstrip("#")
        for gid, n in self.groups.items():
            if n == name:
                return gid
        await self.load_conversations()
        for gid, n in self.groups.items():
            if n == name:
                return gid
        raise ValueError(f"no group named {name}")

    async def history(self, n: int) -> None:
        if self.target is None:
            self.warn("no conversation: use /to NAME, /group or /join-room first")
            return
        kind, conv = self.target
        if kind == Kind.ROOM:
            self.warn("rooms keep no history")
            return
        res = await self.client.history(kind, conv, NEWEST, max(1, min(n, 1000)), backward=True)
        for m in sorted(res.messages, key=lambda m: m.seq):
            await self.resolve_user(m.sender_id)
            self.say(self.format_message(m))
        if not res.messages:
            self.say("* no messages yet")

    async def send_text(self, text: str) -> None:
        if self.target is None:
            self.warn("no conversation: use /to NAME, /group or /join-room first")
            return
        kind, conv = self.target
        try:
            ack = await self.client.send(kind, conv, text)
        except GochatError as e:
            self.warn(f"not sent: {e.message} ({e.code.name})")
            return
        self.say(f"[{self.clock(ack.ts_ms)}] you → {self.conv_label(kind, conv)}: {text}")


def _password(ns: argparse.Namespace) -> str | None:
    if ns.password:
        return str(ns.password)
    env = os.environ.get("GOCHAT_PASSWORD")
    if env:
        return env
    if sys.stdin.isatty():
        return getpass.getpass(f"password for {ns.user}: ")
    return None


async def run_chat(ns: argparse.Namespace) -> int:
    """Run ``gochat chat`` with parsed arguments (see :func:`add_chat_arguments`).

    Returns the process exit code: 0 after ``/quit`` or end of input, 1 when logging in or
    connecting fails, 2 for bad arguments.
    """
    password = _password(ns)
    if not password:
        print("! a password is required: --password or $GOCHAT_PASSWORD", file=sys.stderr, flush=True)
        return 2
    ws_urls: list[str] = list(ns.ws or [DEFAULT_WS])
    api = HttpApi(ns.server)
    client: Client | None = None
    receiver: asyncio.Task[None] | None = None
    try:
        if ns.register:
            try:
                await api.register(ns.user, password)
            except GochatError as e:
                if e.code != ErrorCode.CONFLICT:
                    raise
        tokens = api.token_source(ns.user, password)
        await tokens()  # fail early on bad credentials

        def on_state(state: str) -> None:
            if state == "disconnected":
                print("* connection lost, reconnecting…", flush=True)
            elif state == "connected" and client is not None:
                print("* reconnected", flush=True)

        client = await Client.connect(ws_urls, tokens, on_state=on_state)
        session = ChatSession(client, api, ns.user)
        session.say(f"* connected as {ns.user} (user {client.user_id}); /help for commands")
        with contextlib.suppress(GochatError, TimeoutError):
            await session.load_conversations()
        if getattr(ns, "to", None):
            await session.handle(f"/to {ns.to}")
        receiver = asyncio.create_task(session.receive())
        reader = _StdinReader(sys.stdin)
        while True:
            get = asyncio.ensure_future(reader.readline())
            done, _ = await asyncio.wait({get, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                get.cancel()
                exc = receiver.exception()
                if exc is not None:
                    raise exc
                return 0
            line = get.result()
            if line is None or not await session.handle(line):
                return 0
    except GochatError as e:
        print(f"! {e.message} ({e.code.name})", file=sys.stderr, flush=True)
        return 1
    finally:
        if receiver is not None:
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver
        if client is not None:
            await client.close()
        await api.close()


def chat_main(ns: argparse.Namespace) -> int:
    """Run :func:`run_chat` on a new event loop (uvloop when installed); returns the exit code."""
    from gochat.client import run

    return run(run_chat(ns))
