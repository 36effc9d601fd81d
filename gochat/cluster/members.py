"""Large-group arithmetic on sorted ``uint64`` id arrays (numpy), for the large-group tier.

A large group's member list becomes one sorted, de-duplicated ``uint64`` array; shards are views
of it, the online members are an intersection of sorted arrays, and the split over nodes is one
stable sort of (node, user) pairs cut at the node boundaries — no Python loop per member. The
pure-Python equivalents (``py_*``) are the reference the differential tests and
``bench/members_bench.py`` compare against; they give the same shards and per-node batches.

Wire format unchanged: :func:`encode_users` writes the same bytes as
:func:`gochat.cluster.envelope.encode_users` (user ids little-endian u64), taken straight from
the array's buffer.

numpy costs ~55 ms to import, so this module is imported lazily: by
:class:`~gochat.cluster.link.ClusterLink` once another node is listed (a cluster), never on an
embedded node (docs/dependencies.md, "numpy").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gochat.cluster.envelope import encode_users_packed

__all__ = [
    "Ids",
    "as_sorted_ids",
    "encode_users",
    "intersect_online",
    "node_pairs",
    "py_intersect_online",
    "py_shards",
    "py_sorted_ids",
    "py_split_by_node",
    "shards",
    "split_by_node",
]

#: a sorted, unique array of user ids
Ids = npt.NDArray[np.uint64]
_LE_U64 = np.dtype("<u8")


# ---- numpy -----------------------------------------------------------------------------------
def as_sorted_ids(members: Iterable[int] | npt.NDArray[Any]) -> Ids:
    """``members`` as a sorted ``uint64`` array without duplicates (ids 0 .. 2**64-1; anything
    else raises ``OverflowError``/``ValueError``, as ``struct.pack("<Q")`` would)."""
    if isinstance(members, np.ndarray):
        arr = members.astype(np.uint64, copy=False) if members.dtype == np.uint64 else _checked(members.tolist())
    elif isinstance(members, (list, tuple)):
        arr = _checked(members)
    else:
        arr = _checked(list(members))
    return _sorted_unique(arr)


def _sorted_unique(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``np.unique(a)``: sort, then keep each first of a run. (numpy 2's ``np.unique`` goes
    through a hash table and is ~10x slower on 1,000 ids.)"""
    s = np.sort(a)
    if len(s) < 2:
        return s
    first = np.empty(len(s), dtype=bool)
    first[0] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    return s[first]


def _checked(values: Sequence[int]) -> Ids:
    # np.array(..., dtype=uint64) raises OverflowError on negatives and ids >= 2**64
    return np.array(values, dtype=np.uint64)


def shards(ids: Ids, shard_size: int) -> list[Ids]:
    """``ids`` cut into consecutive views of ``shard_size`` (the last one shorter)."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    if not len(ids):
        return []
    return np.split(ids, np.arange(shard_size, len(ids), shard_size))


def intersect_online(ids: Ids, online_ids: Ids) -> Ids:
    """The members of ``ids`` that are in ``online_ids`` (both sorted and unique), sorted."""
    return np.intersect1d(ids, online_ids, assume_unique=True)


def node_pairs(user_nodes: Mapping[int, Sequence[str]]) -> tuple[Ids, npt.NDArray[np.intp], list[str]]:
    """``user -> nodes`` as parallel arrays: (user ids, node indexes, node names); a user on
    several nodes has one pair per node. (The adapter from a presence answer; a presence index
    kept as arrays skips it.)"""
    names: dict[str, int] = {}
    users: list[int] = []
    nodes: list[int] = []
    for uid, where in user_nodes.items():
        for node in where:
            users.append(uid)
            nodes.append(names.setdefault(node, len(names)))
    return np.array(users, dtype=np.uint64), np.array(nodes, dtype=np.intp), list(names)


def split_by_node(
    ids: Ids, user_nodes: Mapping[int, Sequence[str]] | tuple[Ids, npt.NDArray[np.intp], Sequence[str]]
) -> dict[str, Ids]:
    """node -> those of ``ids`` (sorted, unique) with a session there, each sorted.
    ``user_nodes``: ``user -> nodes``, or :func:`node_pairs`' arrays (a presence index kept as
    arrays). Each (user, node) pair is looked up in ``ids`` (``np.searchsorted``), the pairs
    found become one key ``node * len(ids) + rank``, and one sort orders them by node
    then user and drops repeats; the batches are cut at the node boundaries."""
    pair_users, pair_nodes, names = node_pairs(user_nodes) if isinstance(user_nodes, Mapping) else user_nodes
    n = len(ids)
    if not n or not len(pair_users):
        return {}
    rank = np.searchsorted(ids, pair_users)
    found = ids[np.minimum(rank, n - 1)] == pair_users
    keys = _sorted_unique(pair_nodes[found].astype(np.int64) * n + rank[found])
    if not len(keys):
        return {}
    nodes, users = np.divmod(keys, n)
    cuts = np.flatnonzero(nodes[1:] != nodes[:-1]) + 1
    starts = nodes[np.concatenate(([0], cuts))].tolist()
    return {names[node]: ids[batch] for node, batch in zip(starts, np.split(users, cuts), strict=True)}


def encode_users(ids: Ids, frame: bytes, droppable: bool = False, unordered: bool = False) -> bytes:
    """The USERS envelope of ``ids``: byte for byte what ``envelope.encode_users(ids.tolist(),
    ...)`` writes, the ids copied from the array's buffer as little-endian u64."""
    return encode_users_packed(len(ids), ids.astype(_LE_U64, copy=False).tobytes(), frame, droppable, unordered)


# ---- the pure-Python reference ---------------------------------------------------------------
def py_sorted_ids(members: Iterable[int]) -> list[int]:
    return sorted(set(members))


def py_shards(ids: list[int], shard_size: int) -> list[list[int]]:
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    return [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]


def py_intersect_online(ids: list[int], online: set[int]) -> list[int]:
    return [uid for uid in ids if uid in online]


def py_split_by_node(ids: list[int], user_nodes: Mapping[int, Sequence[str]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for uid in ids:
        for node in dict.fromkeys(user_nodes.get(uid, ())):
            out.setdefault(node, []).append(uid)
    return out
