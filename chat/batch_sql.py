"""The statements of a group-commit batch whose cost grows with its size, without the ORM's
work per row: storing its new messages, and finding the client_ids it resends.

``bulk_create`` spent ~55 µs of CPU per row here (500 rows per transaction on PostgreSQL,
measured in-process: 51-75 µs with the instances built, against 7-10 µs for this statement):
it prepares every field of every row through the field API, then psycopg quotes each value on
the client. The rows of a batch differ in five columns (seq, user, text, client_id, status);
the others take one value per statement: the room, ``created_at`` (one ``timezone.now()``,
as ``auto_now_add`` does for each row, so a batch shares its time) and every remaining field's
default. So PostgreSQL gets the varying columns as one array each (``unnest``, as Django itself
does for ``bulk_create`` on PostgreSQL, but prepared once per column), and SQLite one ``VALUES``
row each, as many per statement as its parameter limit allows. Both return ``(id, seq)``, so
ids are matched by seq, whatever order the database returns them in. Other databases, and
SQLite before 3.35 (no ``RETURNING``), keep ``bulk_create``.

The instances come back as if loaded (``Model.from_db``) with their room and user cached, so
callers read ``message.user`` without a query, as they did with the instances they had built.

Looking up a batch's client_ids through the ORM (``user_id__in``, ``client_id__in``) cost
15-16 µs of CPU per send, against 1-2 µs for the same query with two array parameters
(PostgreSQL) or plain placeholders (SQLite); the messages it finds (resends: rare) are then
loaded through the ORM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import connections, router
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from .models import Message, Room

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# The columns whose values differ from row to row, in the order of NewMessage's fields.
VARYING = ("seq", "user", "text", "client_id", "status")


class NewMessage(NamedTuple):
    seq: int
    user: User
    text: str
    client_id: str
    status: str


@dataclass(frozen=True)
class _Table:
    """Message's fields and quoted names, for one database connection."""

    connection: BaseDatabaseWrapper
    varying: list[Any]  # the fields of VARYING, in its order
    constant: list[Any]  # every other concrete field but the pk: one value per statement

    @classmethod
    def of(cls, connection: BaseDatabaseWrapper) -> _Table:
        meta = Message._meta
        varying = [meta.get_field(name) for name in VARYING]
        constant = [f for f in meta.concrete_fields if f is not meta.pk and f.name not in VARYING]
        return cls(connection, varying, constant)

    def q(self, name: str) -> str:
        return self.connection.ops.quote_name(name)

    def column(self, name: str) -> str:
        field: Any = Message._meta.get_field(name)
        return self.q(field.column)

    @property
    def name(self) -> str:
        return self.q(Message._meta.db_table)

    @property
    def pk(self) -> str:
        pk: Any = Message._meta.pk
        return self.q(pk.column)

    def insert_into(self) -> str:
        columns = ", ".join(self.q(f.column) for f in [*self.varying, *self.constant])
        return f"INSERT INTO {self.name} ({columns})"

    def array_type(self, field: Any) -> str:
        # varchar[] rather than varchar(64)[], as Django's own unnest: no silent truncation.
        return str(field.db_type(self.connection)).split("(")[0] + "[]"

    def prepared(self, field: Any, values: Sequence[Any]) -> list[Any]:
        return [field.get_db_prep_save(v, self.connection) for v in values]


def insert_messages(room: Room, rows: Sequence[NewMessage]) -> list[Message]:
    """Store ``rows`` as new messages of ``room`` (in the caller's transaction); the saved
    instances, in the order of ``rows``. Raises what the database raises (IntegrityError for
    a seq or client_id already stored, DatabaseError...), storing none of them."""
    if not rows:
        return []
    alias = router.db_for_write(Message)
    connection = connections[alias]
    if connection.vendor == "postgresql":
        strategy = _insert_unnest
    elif connection.vendor == "sqlite" and connection.features.can_return_rows_from_bulk_insert:
        strategy = _insert_values
    else:
        return _bulk_create(room, rows)
    table = _Table.of(connection)
    now = timezone.now()
    constants = _constants(table, room, now)
    shared = [f.get_db_prep_save(constants[f.attname], connection) for f in table.constant]
    users = _users(table, rows)
    ids = strategy(table, shared, users, rows)
    return _instances(alias, room, constants, rows, ids)


def stored_by_client_id(
    room: Room, keys: Sequence[tuple[Any, str]]
) -> dict[tuple[Any, str], Message]:
    """The messages of ``room`` already stored under these (user pk, client_id) keys."""
    keys = [k for k in keys if k[1]]
    if not keys:
        return {}
    alias = router.db_for_read(Message)
    connection = connections[alias]
    table = _Table.of(connection)
    user_field = Message._meta.get_field("user")
    user, client = table.column("user"), table.column("client_id")
    select = f"SELECT {table.pk} FROM {table.name} WHERE {table.column('room')} = %s"  # noqa: S608 (quoted names)
    found: list[tuple[Any]] = []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            users = sorted({k[0] for k in keys}, key=str)
            clients = sorted({k[1] for k in keys})
            cursor.execute(
                f"{select} AND {user} = ANY(%s::{table.array_type(user_field)}) "
                f"AND {client} = ANY(%s::varchar[])",
                [room.pk, table.prepared(user_field, users), clients],
            )
            found = cursor.fetchall()
        else:
            # At most one user and one client_id per key: a chunk of keys stays under the limit.
            per_query = max(1, (connection.features.max_query_params or 999) // 2 - 1)
            for start in range(0, len(keys), per_query):
                chunk = keys[start : start + per_query]
                users = sorted({k[0] for k in chunk}, key=str)
                clients = sorted({k[1] for k in chunk})
                cursor.execute(
                    f"{select} AND {user} IN ({', '.join(['%s'] * len(users))}) "
                    f"AND {client} IN ({', '.join(['%s'] * len(clients))})",
                    [room.pk, *table.prepared(user_field, users), *clients],
                )
                found += cursor.fetchall()
    if not found:
        return {}
    # Loaded by the ORM (typed values), and matched on whole keys: the query pairs every
    # user with every client_id it was given.
    wanted = set(keys)
    messages = Message.objects.using(alias).filter(pk__in=[pk for (pk,) in found])
    return {(m.user_id, m.client_id): m for m in messages if (m.user_id, m.client_id) in wanted}


def _constants(table: _Table, room: Room, now: Any) -> dict[str, Any]:
    """Python values (by attname) of the fields every row of the batch shares."""
    values: dict[str, Any] = {}
    for field in table.constant:
        if field.name == "room":
            values[field.attname] = room.pk
        elif field.name == "created_at":
            values[field.attname] = now
        else:
            # A field without a default would get None and fail loudly (NOT NULL), not guess.
            values[field.attname] = field.get_default()
    return values


def _users(table: _Table, rows: Sequence[NewMessage]) -> list[Any]:
    """Each row's user pk as the database takes it (prepared once per user)."""
    field = Message._meta.get_field("user")
    prepared: dict[Any, Any] = {}
    out = []
    for row in rows:
        pk = row.user.pk
        if pk not in prepared:
            prepared[pk] = field.get_db_prep_save(pk, table.connection)
        out.append(prepared[pk])
    return out


def _insert_unnest(
    table: _Table, shared: list[Any], users: list[Any], rows: Sequence[NewMessage]
) -> dict[int, int]:
    arrays = ", ".join(f"%s::{table.array_type(f)}" for f in table.varying)
    scalars = ", ".join(f"%s::{f.db_type(table.connection)}" for f in table.constant)
    names = ", ".join(f"v{i}" for i in range(len(table.varying)))
    sql = (
        f"{table.insert_into()} SELECT {names}, {scalars} "  # noqa: S608 (quoted names)
        f"FROM unnest({arrays}) AS r({names}) RETURNING {table.pk}, {table.column('seq')}"
    )
    # In the order of the placeholders: the shared values (SELECT list), then the arrays.
    params = [
        *shared,
        [r.seq for r in rows],
        users,
        [r.text for r in rows],
        [r.client_id for r in rows],
        [r.status for r in rows],
    ]
    with table.connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {seq: pk for pk, seq in cursor.fetchall()}


def _insert_values(
    table: _Table, shared: list[Any], users: list[Any], rows: Sequence[NewMessage]
) -> dict[int, int]:
    width = len(table.varying) + len(table.constant)
    per_statement = max(1, (table.connection.features.max_query_params or 999) // width)
    one = "(" + ", ".join(["%s"] * width) + ")"
    ids: dict[int, int] = {}
    with table.connection.cursor() as cursor:
        for start in range(0, len(rows), per_statement):
            chunk = range(start, min(start + per_statement, len(rows)))
            params: list[Any] = []
            for i in chunk:
                r = rows[i]
                params += (r.seq, users[i], r.text, r.client_id, r.status, *shared)
            sql = (
                f"{table.insert_into()} VALUES {', '.join([one] * len(chunk))} "
                f"RETURNING {table.pk}, {table.column('seq')}"
            )
            cursor.execute(sql, params)
            ids.update({seq: pk for pk, seq in cursor.fetchall()})
    return ids


def _instances(
    alias: str,
    room: Room,
    constants: dict[str, Any],
    rows: Sequence[NewMessage],
    ids: dict[int, int],
) -> list[Message]:
    meta = Message._meta
    names = [f.attname for f in meta.concrete_fields]
    room_field: Any = meta.get_field("room")
    user_field: Any = meta.get_field("user")
    pk_name = meta.pk.attname
    out = []
    for row in rows:
        values = {
            **constants,
            pk_name: ids[row.seq],
            "seq": row.seq,
            user_field.attname: row.user.pk,
            "text": row.text,
            "client_id": row.client_id,
            "status": row.status,
        }
        message = Message.from_db(alias, names, [values[n] for n in names])
        room_field.set_cached_value(message, room)
        user_field.set_cached_value(message, row.user)
        out.append(message)
    return out


def _bulk_create(room: Room, rows: Sequence[NewMessage]) -> list[Message]:
    messages = [
        Message(
            room=room,
            seq=r.seq,
            user=r.user,
            text=r.text,
            client_id=r.client_id,
            status=r.status,
        )
        for r in rows
    ]
    Message.objects.bulk_create(messages)
    return messages
