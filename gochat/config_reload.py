"""Hot reload of the reloadable settings (docs/configuration.md, "Hot reload").

A :class:`ConfigReloader` holds a node's running :class:`~gochat.config.Settings` and its
``config_version``. A change comes from SIGHUP (the node's TOML file read again, with the
environment and command-line overrides on top, as at start) or from ``PUT /v1/admin/config``.
It is validated in full; a change to a setting that is not reloadable, an unknown setting or an
invalid value is refused with a :class:`~gochat.errors.ConfigError` naming it, and the running
configuration stays. A valid change is applied through the node's hooks (one per reloadable
setting: :func:`node_hooks`), the version goes up by one and a
:class:`~gochat.cluster.bus.ConfigChanged` carrying every reloadable value is published. Every
node applies such an event when it is newer, by (version, origin), than what it runs, so after
the events settle all nodes run the same values under the same version; an older event, or one
seen twice, changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from gochat.cluster.bus import ConfigChanged, DomainEvent
from gochat.config import Settings, reloadable_settings, validate_settings
from gochat.errors import ConfigError

__all__ = ["ConfigReloader", "Hook", "node_hooks"]

log = logging.getLogger("gochat.config")

#: applies the new settings' value of one reloadable setting on the running node
Hook = Callable[[Settings], None]

_TYPES = {f.name: f.type for f in dataclasses.fields(Settings)}


def _json_value(name: str, value: Any) -> Any:
    """A JSON value for setting ``name``, strictly of the setting's type (an int for a float too)."""
    kind = _TYPES[name]
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    raise ConfigError(f"setting {name!r} must be a {kind}, not {value!r}")


class ConfigReloader:
    """A node's running configuration, its version and the hooks that apply a change."""

    def __init__(
        self,
        settings: Settings,
        hooks: Mapping[str, Hook],
        *,
        origin: str = "",
        publish: Callable[[DomainEvent], None] | None = None,
        on_change: Callable[[Settings], None] | None = None,
    ) -> None:
        missing = reloadable_settings() - set(hooks)
        extra = set(hooks) - reloadable_settings()
        if missing or extra:
            raise ValueError(f"hooks must cover the reloadable settings: missing {sorted(missing)}, extra {sorted(extra)}")
        self.settings = settings
        self.hooks = dict(hooks)
        self.origin = origin
        self.publish = publish
        self.on_change = on_change
        #: the running configuration's version (0: as started) and the node that made it
        self.version = 0
        self.version_origin = ""
        #: reloads refused (malformed file, invalid or non-reloadable change)
        self.failures = 0

    def values(self) -> dict[str, Any]:
        """The running values of the reloadable settings."""
        return {name: getattr(self.settings, name) for name in sorted(reloadable_settings())}

    def check(self, new: Settings) -> list[str]:
        """The reloadable settings ``new`` changes; :class:`ConfigError` when it is invalid or
        changes a setting that is not reloadable (nothing is applied)."""
        validate_settings(new)
        fixed = [
            f.name
            for f in dataclasses.fields(Settings)
            if f.name not in reloadable_settings() and getattr(new, f.name) != getattr(self.settings, f.name)
        ]
        if fixed:
            raise ConfigError(f"not reloadable (restart the node to change): {', '.join(fixed)}")
        return [name for name in sorted(reloadable_settings()) if getattr(new, name) != getattr(self.settings, name)]

    def change(self, changes: Mapping[str, Any]) -> list[str]:
        """Apply ``changes`` (setting → JSON value; the admin API) here and publish them: the
        names of the settings that changed. :class:`ConfigError` and nothing applied for an
        unknown or non-reloadable setting, a value of the wrong type or an invalid one."""
        unknown = sorted(set(changes) - set(_TYPES))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        fixed = sorted(set(changes) - reloadable_settings())
        if fixed:
            raise ConfigError(f"not reloadable (restart the node to change): {', '.join(fixed)}")
        values = {name: _json_value(name, value) for name, value in changes.items()}
        return self.reload(self.settings.replace(**values))

    def reload(self, new: Settings) -> list[str]:
        """Apply ``new`` (validated by :meth:`check`) here and publish it: the changed names."""
        changed = self.check(new)
        if changed:
            self._apply(new, changed, self.version + 1, self.origin)
            if self.publish is not None:
                self.publish(ConfigChanged(version=self.version, origin=self.origin, values=self.values()))
        return changed

    def reload_file(self, load: Callable[[], Settings]) -> bool:
        """SIGHUP: ``load()`` the configuration again and apply it. A malformed file or an
        invalid or non-reloadable change is logged and counted; the running one stays."""
        try:
            changed = self.reload(load())
        except ConfigError as exc:
            self.failures += 1
            log.error("configuration reload refused, version %d kept: %s", self.version, exc.message)
            return False
        if changed:
            log.info("configuration reloaded: version %d (%s)", self.version, ", ".join(changed))
        else:
            log.info("configuration reloaded: nothing changed (version %d)", self.version)
        return True

    def apply_event(self, event: ConfigChanged) -> bool:
        """Another node's (or this node's own) change, from the event bus: applied when newer by
        (version, origin) than the running configuration. Whether it was applied."""
        if (event.version, event.origin) <= (self.version, self.version_origin):
            return False
        known = {k: v for k, v in event.values.items() if k in reloadable_settings()}
        try:
            new = self.settings.replace(**{k: _json_value(k, v) for k, v in known.items()})
            changed = self.check(new)
        except ConfigError as exc:
            self.failures += 1
            log.error("config version %d from %s refused: %s", event.version, event.origin, exc.message)
            return False
        self._apply(new, changed, event.version, event.origin)
        log.info("config version %d from %s applied (%s)", event.version, event.origin, ", ".join(changed) or "no change")
        return True

    def _apply(self, new: Settings, changed: list[str], version: int, origin: str) -> None:
        self.settings = new
        for name in changed:
            self.hooks[name](new)
        self.version, self.version_origin = version, origin
        if self.on_change is not None:
            self.on_change(new)


def node_hooks(server: Any) -> dict[str, Hook]:
    """How a running node (``gochat.server.Server``, started) applies each reloadable setting."""

    def core_settings(s: Settings) -> None:
        # the messaging core reads history_max_limit from its settings at each HISTORY
        server.core.settings = s

    def gateway_settings(s: Settings) -> None:
        # each new connection gets the token bucket of the gateway's settings (open ones keep theirs)
        server.gateway.settings = s

    def slow_query_ms(s: Settings) -> None:
        slow = getattr(server.store, "slow_queries", None)
        if slow is not None:
            slow.set_threshold_ms(s.slow_query_ms)

    def log_level(s: Settings) -> None:
        logging.getLogger().setLevel(getattr(logging, s.log_level.upper(), logging.INFO))

    def max_group_members(s: Settings) -> None:
        server.core.calls.max_group_members = s.max_group_members

    def overload(s: Settings) -> None:
        server.core.sends.accounting.set_shed_after_ms(s.overload_send_latency_ms)
        threshold = getattr(server, "threshold", None)
        if threshold is not None:  # the commit latency at which its load pressure is full
            threshold.commit_full_s = s.overload_send_latency_ms / 1000 or 0.25

    def large_group_threshold(s: Settings) -> None:
        threshold = getattr(server, "threshold", None)
        if threshold is not None and threshold.enabled:
            threshold.reset(s.large_group_threshold)  # the dynamic threshold's current value, bounded
        else:
            server.core.delivery.large_group_threshold = s.large_group_threshold

    def fanout(s: Settings) -> None:
        delivery = server.core.delivery
        delivery.inline_max, delivery.cascade_min = s.fanout_inline_max, s.fanout_cascade_min
        delivery.jobs.chunk, delivery.jobs.max_jobs = s.fanout_chunk, s.fanout_max_jobs
        server.cluster.shard_size = s.fanout_shard_size

    return {
        "fanout_inline_max": fanout,
        "fanout_cascade_min": fanout,
        "fanout_shard_size": fanout,
        "fanout_chunk": fanout,
        "fanout_max_jobs": fanout,
        "history_max_limit": core_settings,
        "rate_limit_per_s": gateway_settings,
        "rate_limit_burst": gateway_settings,
        "slow_query_ms": slow_query_ms,
        "log_level": log_level,
        "max_group_members": max_group_members,
        "overload_send_latency_ms": overload,
        "large_group_threshold": large_group_threshold,
    }
