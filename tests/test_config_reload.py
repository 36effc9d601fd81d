"""Hot reload (gochat/config_reload.py; docs/configuration.md, "Hot reload"): validation and
refusals, version ordering of the cluster's events, SIGHUP's file reading, and every reloadable
setting reaching its consumer on a started embedded node."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from gochat.cluster.bus import ConfigChanged, DomainEvent, decode_event, encode_event
from gochat.config import Settings, load_settings, reloadable_settings
from gochat.config_reload import ConfigReloader, node_hooks
from gochat.errors import ConfigError


def _reloader(settings: Settings | None = None) -> tuple[ConfigReloader, list[str], list[DomainEvent]]:
    applied: list[str] = []
    published: list[DomainEvent] = []
    hooks = {name: (lambda s, name=name: applied.append(name)) for name in reloadable_settings()}
    reloader = ConfigReloader(settings or Settings(), hooks, origin="node-a", publish=published.append)
    return reloader, applied, published


def test_every_reloadable_setting_has_an_apply_hook_and_only_those() -> None:
    assert reloadable_settings() == {
        "history_max_limit", "max_group_members", "large_group_threshold", "overload_send_latency_ms",
        "rate_limit_per_s", "rate_limit_burst", "slow_query_ms", "log_level",
        "fanout_inline_max", "fanout_cascade_min", "fanout_shard_size", "fanout_chunk", "fanout_max_jobs",
    }
    assert set(node_hooks(object())) == reloadable_settings()
    with pytest.raises(ValueError, match="history_max_limit"):
        ConfigReloader(Settings(), {k: v for k, v in node_hooks(object()).items() if k != "history_max_limit"})
    with pytest.raises(ValueError, match="ws_port"):
        ConfigReloader(Settings(), {**node_hooks(object()), "ws_port": lambda s: None})


def test_a_change_is_applied_versioned_and_published() -> None:
    reloader, applied, published = _reloader()
    assert reloader.version == 0
    changed = reloader.change({"history_max_limit": 50, "overload_send_latency_ms": 100})
    assert changed == ["history_max_limit", "overload_send_latency_ms"] == sorted(applied)
    assert reloader.version == 1
    assert reloader.settings.history_max_limit == 50
    assert reloader.settings.overload_send_latency_ms == 100.0
    (event,) = published
    assert isinstance(event, ConfigChanged)
    assert (event.version, event.origin) == (1, "node-a")
    assert event.values == reloader.values()
    assert decode_event(encode_event(event)) == event
    # the same values again: nothing changes, nothing published
    assert reloader.change({"history_max_limit": 50}) == []
    assert reloader.version == 1 and len(published) == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"no_such_setting": 1}, "unknown setting.*no_such_setting"),
        ({"ws_port": 9000}, "not reloadable.*ws_port"),
        ({"history_max_limit": 10, "admin_token": "x" * 20}, "not reloadable.*admin_token"),
        ({"history_max_limit": "ten"}, "history_max_limit.*must be a int"),
        ({"history_max_limit": 1.5}, "history_max_limit"),
        ({"history_max_limit": True}, "history_max_limit"),
        ({"history_max_limit": 0}, "history_max_limit"),
        ({"overload_send_latency_ms": -1}, "overload_send_latency_ms"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"rate_limit_per_s": 0}, "rate_limit_per_s"),
    ],
)
def test_bad_changes_are_refused_and_nothing_is_applied(changes: dict[str, Any], message: str) -> None:
    reloader, applied, published = _reloader()
    before = reloader.settings
    with pytest.raises(ConfigError, match=message):
        reloader.change(changes)
    assert (reloader.settings, reloader.version, applied, published) == (before, 0, [], [])


def test_sighup_reads_the_file_again_and_a_malformed_one_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "gochat.toml"
    cfg.write_text("[gochat]\nhistory_max_limit = 100\n")
    env = {"GOCHAT_MAX_GROUP_MEMBERS": "30"}

    def load() -> Settings:
        return load_settings(cfg, env=env, overrides={"log_level": "WARNING"})

    reloader, _, published = _reloader(load())
    cfg.write_text("[gochat]\nhistory_max_limit = 7\nmax_group_members = 99\nlog_level = 'DEBUG'\n")
    assert reloader.reload_file(load)
    # the file's new value applies; the environment and the flags stay on top of it
    s = reloader.settings
    assert (s.history_max_limit, s.max_group_members, s.log_level) == (7, 30, "WARNING")
    assert reloader.version == 1 and len(published) == 1

    for bad, why in (
        ("[gochat\nhistory_max_limit = 1\n", "cannot read config file"),
        ("[gochat]\nhistory_max_limit = 0\n", "history_max_limit"),
        ("[gochat]\nhistory_max_limit = 5\nws_port = 1234\n", "not reloadable.*ws_port"),
        ("[gochat]\nhistroy_max_limit = 5\n", "unknown setting"),
    ):
        cfg.write_text(bad)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gochat.config"):
            assert not reloader.reload_file(load)
        assert any("configuration reload refused" in r.message for r in caplog.records), bad
        assert caplog.records[-1].message.split("kept: ", 1)[1] != ""
        assert re.search(why, caplog.records[-1].message), (bad, caplog.records[-1].message)
        assert (reloader.settings, reloader.version, len(published)) == (s, 1, 1)
    assert reloader.failures == 4


def test_events_apply_in_version_order_and_idempotently() -> None:
    reloader, _, _ = _reloader()
    base = reloader.values()

    def event(version: int, origin: str, **values: Any) -> ConfigChanged:
        return ConfigChanged(version=version, origin=origin, values={**base, **values})

    assert reloader.apply_event(event(2, "node-b", history_max_limit=20))
    assert (reloader.version, reloader.settings.history_max_limit) == (2, 20)
    # the same event again, and an older one: nothing changes
    assert not reloader.apply_event(event(2, "node-b", history_max_limit=20))
    assert not reloader.apply_event(event(1, "node-c", history_max_limit=10))
    assert reloader.settings.history_max_limit == 20
    # two changes made at once with the same version: the larger origin wins on every node
    assert reloader.apply_event(event(2, "node-c", history_max_limit=30))
    assert not reloader.apply_event(event(2, "node-a", history_max_limit=40))
    assert reloader.settings.history_max_limit == 30
    # a local change after that goes on from the version it runs
    reloader.change({"history_max_limit": 60})
    assert reloader.version == 3
    # an event with an invalid value is refused, the running configuration stays
    assert not reloader.apply_event(event(9, "node-b", history_max_limit=0))
    assert (reloader.version, reloader.settings.history_max_limit) == (3, 60)
    # unknown settings in an event (a newer node's) are ignored
    assert reloader.apply_event(event(4, "node-b", history_max_limit=61, some_new_setting=1))
    assert reloader.settings.history_max_limit == 61


def test_each_reloadable_setting_reaches_its_consumer_on_a_running_node(tmp_path: Path) -> None:
    """Every consumer kind: the messaging core's settings, the group calls, the send shedding,
    the fan-out, the gateway's per-connection token bucket, the store's slow-statement log and the
    root logger; and the version in the registry entry and /metrics."""
    from gochat.server import Server

    s = load_settings(
        env={
            "GOCHAT_DATA_DIR": str(tmp_path),
            "GOCHAT_WS_PORT": "0",
            "GOCHAT_HTTP_PORT": "0",
            # the dynamic threshold bounds a reloaded large_group_threshold: 5 lies within these
            "GOCHAT_LARGE_GROUP_THRESHOLD_MIN": "1",
        }
    )
    new = {
        "history_max_limit": 3,
        "max_group_members": 4,
        "large_group_threshold": 5,
        "overload_send_latency_ms": 6.0,
        "rate_limit_per_s": 7.0,
        "rate_limit_burst": 8,
        "slow_query_ms": 9.0,
        "log_level": "ERROR",
        "fanout_inline_max": 2,
        "fanout_cascade_min": 11,
        "fanout_shard_size": 12,
        "fanout_chunk": 13,
        "fanout_max_jobs": 14,
    }
    assert set(new) == reloadable_settings()
    root = logging.getLogger()
    level = root.level

    async def scenario() -> None:
        server = Server(s)
        await server.start()
        try:
            assert server._node_info().config_version == 0
            assert sorted(server.config.change(new)) == sorted(new)
            core = server.core
            assert core.settings.history_max_limit == 3
            assert core.calls.max_group_members == 4
            assert core.delivery.large_group_threshold == 5
            assert (core.delivery.inline_max, core.delivery.cascade_min) == (2, 11)
            assert (core.delivery.jobs.chunk, core.delivery.jobs.max_jobs) == (13, 14)
            assert server.cluster.shard_size == 12
            assert core.sends.accounting._shed_after_s == pytest.approx(0.006)
            assert server.gateway.settings.rate_limit_per_s == 7.0
            assert server.gateway.settings.rate_limit_burst == 8
            assert server.store.slow_queries.threshold_ms == pytest.approx(9.0)  # type: ignore[attr-defined]
            assert root.level == logging.ERROR
            assert server.settings.history_max_limit == 3
            assert server._node_info().config_version == 1
            await asyncio.sleep(0.05)
            gateways = await server.gateways()
            assert [g["config_version"] for g in gateways] == [1]
            metrics = server.metrics
            from prometheus_client import generate_latest

            text = generate_latest(metrics.registry).decode()
            assert "gochat_config_version 1.0" in text
            assert "gochat_config_reload_failures_total 0.0" in text
        finally:
            await server.stop()
            root.setLevel(level)

    asyncio.run(scenario())
