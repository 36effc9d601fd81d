"""Cluster :class:`~gochat.store.base.Store` on PostgreSQL (asyncpg pool, group commit).

Same contract and semantics as :mod:`gochat.store.sqlite`; several gochat nodes share one
database (one schema). ``docs/storage-and-auth.md`` §8 describes the schema and the choices.

Group commit
------------
``append()`` puts its request on an in-process queue (synchronously, so call order is queue
order) and waits on a future. One **committer task** takes everything queued (up to
``max_batch``) and writes it with **one statement**, which PostgreSQL runs as one transaction:
the arrays of the batch are ``unnest()``-ed, the dedup keys go into ``message_keys`` with
``ON CONFLICT DO NOTHING`` (the UNIQUE (sender_id, client_msg_id) check, which waits for and
sees concurrent transactions of other nodes), the new messages of each conversation are numbered
in call order (``row_number()``), each conversation's ``last_seq`` is advanced once by the
number of new messages (``UPDATE … RETURNING``, which row-locks it against other nodes) and the
messages are inserted. One round trip and one WAL flush per batch. Requests the statement did
not store (duplicates, unknown conversations) are explained by one follow-up read. Futures are
resolved in call order only after the statement returned, i.e. after COMMIT.

Failures
--------
Connection errors, ``OSError``, timeouts, PostgreSQL shutting down (class 57), out of resources
(class 53) → :class:`~gochat.errors.UnavailableError` (retryable) for every request of the
batch; nothing is acknowledged that did not commit (an outcome that is unknown because the link
broke during COMMIT is reported as unavailable; a retry is safe thanks to dedup). The broken
connection is terminated; the pool opens a new one on the next use, so the store recovers by
itself when PostgreSQL is back. Every operation is bounded by ``command_timeout`` (``ping`` by
``ping_timeout``). A deadlock or serialization failure between nodes retries the batch.
Invalid values (integers outside bigint) → ``BAD_REQUEST``; integrity violations → ``CONFLICT``.

The store is bound to the event loop that called :meth:`PostgresStore.open`.

Modules
-------
* :mod:`.schema`: ``MIGRATIONS``, ``SCHEMA_VERSION``, ``MESSAGE_PARTITIONS``, :func:`migrate`.
* :mod:`.pool`: ``_with_conn``/``_read``/``_write`` on the asyncpg pool, error mapping.
* :mod:`.commit`: the append queue and the committer task (the group-commit statement).
* :mod:`.engine`: :class:`~.engine.PostgresEngine`, configuration, open/close/ping, stats.
* :mod:`.timing`: the pool's connection class that times every statement (slow queries);
  :mod:`.explain`: plans out of band; :mod:`.hot_queries` and :mod:`.doctor`: what
  ``gochat doctor`` checks.
* :mod:`.users`, :mod:`.tokens`, :mod:`.conversations`, :mod:`.messages`: one repository class
  each, built on the engine; :class:`PostgresStore` combines them.
"""

from __future__ import annotations

from gochat.store.postgres.conversations import ConversationRepository
from gochat.store.postgres.engine import PostgresStoreStats
from gochat.store.postgres.messages import MessageRepository
from gochat.store.postgres.schema import MESSAGE_PARTITIONS, MIGRATIONS, SCHEMA_VERSION, migrate
from gochat.store.postgres.tokens import TokenRepository
from gochat.store.postgres.users import UserRepository

__all__ = [
    "MESSAGE_PARTITIONS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PostgresStore",
    "PostgresStoreStats",
    "migrate",
]


class PostgresStore(UserRepository, TokenRepository, ConversationRepository, MessageRepository):
    """PostgreSQL implementation of :class:`gochat.store.base.Store`.

    ``dsn`` is an asyncpg/libpq connection string. ``schema`` holds every table (created by
    :func:`migrate` or at :meth:`open`). ``node_id``/``ids``: the ``msg_id`` generator, as for
    :class:`~gochat.store.sqlite.SQLiteStore` (share the process's one). ``min_size``/``max_size``:
    the connection pool. ``max_batch``: appends per group-commit statement. ``max_pending``:
    queued appends beyond which appends fail fast with ``OVERLOADED``. ``command_timeout``
    bounds every operation (acquiring a connection included), ``connect_timeout`` every new
    connection, ``ping_timeout`` the readiness probe. ``slow_query_ms``: statements that take
    this long or longer go to ``slow_queries``, with their plans (docs/observability.md, "Slow
    queries").
    """
