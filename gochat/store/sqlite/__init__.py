"""Embedded :class:`~gochat.store.base.Store` on SQLite (WAL, one writer thread, group commit).

Threads and connections
-----------------------
* One **writer thread** owns the only writing connection. Every write (appends, users, tokens,
  groups, read positions) is a queue entry; the thread takes everything queued (up to
  ``max_batch`` entries) and applies it in **one** ``BEGIN IMMEDIATE … COMMIT`` transaction,
  then resolves the waiting asyncio futures with one ``loop.call_soon_threadsafe`` per event
  loop per batch. Under load, hundreds of appends share one fsync.
* Reads run on a small pool of reader threads, each with its own connection (WAL lets readers
  run concurrently with the writer and see only committed data). Multi-statement reads use one
  read transaction, so they see one snapshot.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``: the WAL is fsynced at every commit,
so a message whose future resolved survives ``kill -9`` and power loss. Nothing resolves before
the commit returns.

Failure mapping: ``sqlite3.OperationalError`` / ``DatabaseError`` (disk full, I/O error, locked
past ``busy_timeout_ms``, corrupt file) → :class:`~gochat.errors.UnavailableError` for every
request of the failed transaction (nothing was committed, nothing is acknowledged). Business
errors (unknown user → ``NOT_FOUND``, name taken → ``CONFLICT``, ...) fail only their own
request: generic write jobs run inside a ``SAVEPOINT``; appends are validated before they write.

Modules
-------
* :mod:`.schema`: ``MIGRATIONS``, ``SCHEMA_VERSION`` and ``migrate``.
* :mod:`.engine`: :class:`~.engine.SQLiteEngine`, the connections, the writer thread and its
  queue, the reader pool, ``_read``/``_write``, open/close/ping/stats.
* :mod:`.commit`: the writer's loop and its group-commit transactions (the append hot path).
* :mod:`.timing`: the connection class that times every statement (slow queries);
  :mod:`.hot_queries` and :mod:`.doctor`: what ``gochat doctor`` checks.
* :mod:`.users`, :mod:`.tokens`, :mod:`.conversations`, :mod:`.messages`: one repository class
  each, built on the engine; :class:`SQLiteStore` combines them.
"""

from __future__ import annotations

from gochat.store.sqlite.conversations import ConversationRepository
from gochat.store.sqlite.engine import SQLiteStoreStats
from gochat.store.sqlite.messages import MessageRepository
from gochat.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from gochat.store.sqlite.tokens import TokenRepository
from gochat.store.sqlite.users import UserRepository

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore", "SQLiteStoreStats"]


class SQLiteStore(UserRepository, TokenRepository, ConversationRepository, MessageRepository):
    """SQLite implementation of :class:`gochat.store.base.Store`.

    ``path`` is the database file (its directory must exist). ``node_id`` feeds the ``msg_id``
    generator. ``max_batch`` caps the entries applied in one transaction; ``max_pending``
    caps queued writes (beyond it writes fail fast with ``OVERLOADED`` instead of growing memory
    without bound). ``readers`` is the number of reader threads/connections. ``ids`` is the
    process's msg_id generator (shared with the messaging core, which numbers room messages);
    without it the store makes its own. ``commit_delay_ms``: after a busy commit (at least 16
    writes) the writer waits, at most this long and at most as long as that commit took, or
    until ``max_batch`` writes are queued, before the next one, so that batches grow under
    load; a lone write at low load is never delayed. ``slow_query_ms``: statements that take
    this long or longer go to ``slow_queries`` (docs/observability.md, "Slow queries").
    """
