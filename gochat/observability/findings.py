"""What ``gochat doctor`` reports: findings (a check's verdict on one subject, with what to fix)
and the hot queries each store declares next to its schema.

The store packages (``gochat/store/sqlite/doctor.py``, ``gochat/store/postgres/doctor.py``)
and :mod:`gochat.doctor` build findings; :mod:`gochat.doctor` prints them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["Finding", "HotQuery", "Status"]


class Status(StrEnum):
    """``ok``: checked and fine; ``info``: worth knowing, nothing to fix; ``warn``: fix it soon;
    ``error``: broken now. ``gochat doctor`` exits 1 when any finding is warn or error."""

    OK = "ok"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"

    @property
    def failing(self) -> bool:
        return self in (Status.WARN, Status.ERROR)


@dataclass(frozen=True, slots=True)
class Finding:
    #: the check: schema, indexes, hot_query, statistics, replication, redis, clock
    check: str
    status: Status
    #: what was checked (an index, a table, a query, a node, a setting)
    subject: str
    message: str
    #: what to do about it (empty when nothing)
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = str(self.status)
        return d


@dataclass(frozen=True, slots=True)
class HotQuery:
    """A statement a store runs often, the indexes it must use, and parameter values to plan it
    with. ``sql`` is the statement as the store's repository writes it (``{s}``: the quoted
    schema on PostgreSQL); tests check that the store really runs it (same fingerprint) and that
    every index named here is created by the migrations."""

    name: str
    sql: str
    params: tuple[Any, ...]
    #: index names the plan must use (a partition's index counts for its parent's)
    indexes: tuple[str, ...] = ()
    #: what it serves, for the report
    purpose: str = ""
