"""Settings resolve from defaults, TOML, GOCHAT_* variables and flags, in that order."""

from __future__ import annotations

from pathlib import Path

import pytest

from gochat.config import Settings, load_settings, settings_markdown
from gochat.errors import ConfigError


def test_defaults() -> None:
    s = load_settings(env={})
    assert (s.host, s.ws_port, s.http_port, s.data_dir) == ("127.0.0.1", 8700, 8701, "./gochat-data")


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "gochat.toml"
    cfg.write_text('[gochat]\nws_port = 9000\nhttp_port = 9001\nmax_body = 1000\n')
    s = load_settings(cfg, env={"GOCHAT_HTTP_PORT": "9100", "GOCHAT_JWT_ALGORITHM": "RS256"}, overrides={"max_body": 2000})
    assert (s.ws_port, s.http_port, s.jwt_algorithm, s.max_body) == (9000, 9100, "RS256", 2000)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GOCHAT_WS_PORT": "eighty"}, "ws_port"),
        ({"GOCHAT_JWT_ALGORITHM": "HS256"}, "jwt_algorithm"),
        ({"GOCHAT_NODE_ID": "5000"}, "node_id"),
        ({"GOCHAT_OUTBOUND_SOFT_LIMIT": "999999999"}, "outbound_soft_limit"),
    ],
)
def test_invalid_values_are_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("wsport = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(cfg, env={})


def test_settings_frozen_and_documented() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.ws_port = 1  # type: ignore[misc]
    table = settings_markdown()
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert table in doc, "docs/configuration.md must contain the generated settings table"


def test_store_commit_delay_setting(tmp_path: Path) -> None:
    """GOCHAT_STORE_COMMIT_DELAY_MS reaches the embedded store; out-of-range values are refused."""
    import asyncio

    from gochat.server import Server

    s = load_settings(
        env={"GOCHAT_STORE_COMMIT_DELAY_MS": "0", "GOCHAT_DATA_DIR": str(tmp_path), "GOCHAT_WS_PORT": "0",
             "GOCHAT_HTTP_PORT": "0"}
    )
    assert s.store_commit_delay_ms == 0.0
    for bad in ("-1", "5000"):
        with pytest.raises(ConfigError, match="store_commit_delay_ms"):
            load_settings(env={"GOCHAT_STORE_COMMIT_DELAY_MS": bad})

    async def started_store_delay() -> float:
        server = Server(s)
        await server.start()
        try:
            return server.store.commit_delay_s  # type: ignore[attr-defined,no-any-return]
        finally:
            await server.stop()

    assert asyncio.run(started_store_delay()) == 0.0


def test_overload_send_latency_setting() -> None:
    """GOCHAT_OVERLOAD_SEND_LATENCY_MS: 250 ms by default, 0 turns shedding off, and out-of-range
    values are refused (the behaviour itself: tests/e2e, test_sends_are_shed_...)."""
    assert load_settings(env={}).overload_send_latency_ms == 250.0
    assert load_settings(env={"GOCHAT_OVERLOAD_SEND_LATENCY_MS": "0"}).overload_send_latency_ms == 0.0
    for bad in ("-5", "61000"):
        with pytest.raises(ConfigError, match="overload_send_latency_ms"):
            load_settings(env={"GOCHAT_OVERLOAD_SEND_LATENCY_MS": bad})
