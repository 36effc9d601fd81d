"""The shared (L2) cache seam: :class:`SharedCache`, what every node of a cluster reads before
the store when its in-process (L1) cache misses (docs/consistency.md, "Caches").

Backends: :class:`~gochat.cluster.memory_cache.MemorySharedCache` (embedded mode: in-process
"nodes" that share a :class:`~gochat.cluster.memory.MemoryHub` share it) and
:class:`~gochat.cluster.redis.cache.RedisSharedCache` (cluster mode). Both hold opaque bytes
under ``(space, key)`` with a TTL, in two kinds of entries:

- **versioned** (a group's members): each entry carries the version of its value and a *stamp*,
  the backend's clock (µs) at which the value was known to be current. A write replaces an
  entry only when it is newer (compare-and-set in one step); a write of the same version
  keeps the value and moves the stamp forward (the value was read again, still current), so
  an older version never replaces a newer one, whatever the order writes arrive in.
- **write-once** (immutable values: the direct-conversation directory, usernames): set when
  absent, never replaced.

Reads of versioned entries also return the backend's clock, so a reader can stamp what it
writes back with a time *before* it read the store. Nothing here interprets the bytes:
:func:`pack_members` / :func:`unpack_members` are the member lists' layout (u64 little-endian,
8 bytes a member; cheaper to read back than JSON, measured in docs/consistency.md). Every
operation may raise :class:`~gochat.errors.UnavailableError` (backend unreachable); callers treat
the cache as best effort. One entry holds at most :data:`MAX_ENTRY_BYTES`; a larger value is
refused with ``ValueError`` (callers check :func:`fits` first).
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "MAX_ENTRY_BYTES",
    "SharedCache",
    "Versioned",
    "check_entry",
    "fits",
    "pack_members",
    "unpack_members",
]

#: bytes one entry may hold: 131,072 members of a group (8 bytes each); a larger member list
#: is not shared (each node reads it from the store)
MAX_ENTRY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Versioned:
    """A versioned entry: its value's version, the backend clock (µs) at which the value was
    known to be current, and the value."""

    version: int
    stamp_us: int
    data: bytes


def fits(data: bytes) -> bool:
    return len(data) <= MAX_ENTRY_BYTES


def check_entry(space: str, key: str, data: bytes) -> None:
    """What every backend checks before a write."""
    if not space or ":" in space:
        raise ValueError(f"bad cache space {space!r}")
    if not key:
        raise ValueError("empty cache key")
    if not fits(data):
        raise ValueError(f"cache entry {space}:{key} is {len(data)} bytes, over {MAX_ENTRY_BYTES}")


def pack_members(members: Sequence[int]) -> bytes:
    """Member ids as u64 little-endian (ids are at most 2**63 - 1)."""
    a = array.array("Q", members)
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        a.byteswap()
    return a.tobytes()


def unpack_members(data: bytes) -> tuple[int, ...]:
    if len(data) % 8:
        raise ValueError(f"a packed member list is a multiple of 8 bytes, not {len(data)}")
    return struct.unpack(f"<{len(data) // 8}Q", data)


@runtime_checkable
class SharedCache(Protocol):
    """A cache every node of a cluster shares: bounded entries with a TTL, versioned or
    write-once (module doc). ``space`` is a short name without ``:`` (``members``, ``direct``,
    ``user``), ``key`` a string."""

    async def get_versioned(self, space: str, keys: Sequence[str]) -> tuple[list[Versioned | None], int]:
        """The entries of ``keys`` (None: absent or expired), in order, and the backend's
        clock in µs, read no later than the entries (one round trip)."""

    async def put_versioned(
        self, space: str, key: str, version: int, data: bytes, ttl_s: float, stamp_us: int | None = None
    ) -> bool:
        """Store ``data`` at ``version`` unless the entry holds a newer version; True when the
        value was stored. An entry of the same version keeps its value and takes the later of
        the two stamps. ``stamp_us``: when ``data`` was known to be current, on the backend's
        clock (from :meth:`get_versioned`); None: now. Either way the TTL starts again."""

    async def get(self, space: str, key: str) -> bytes | None:
        """A write-once entry (None: absent or expired)."""

    async def put_once(self, space: str, key: str, data: bytes, ttl_s: float) -> bool:
        """Store a write-once entry unless one exists; True when stored."""

    async def close(self) -> None: ...
