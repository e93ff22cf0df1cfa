"""chat.batch_sql: a batch's messages stored with one statement, and its resends found, give
what the ORM gave (bulk_create, the filter they replace), on SQLite here and on PostgreSQL."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from chat import batch_sql
from chat.batch_sql import NewMessage
from chat.models import Message, Room
from tests.servers import run_django_script

# Texts a hand-written statement could get wrong: quotes, placeholders, separators, NUL-free
# control characters, every UTF-8 length, and a long one.
AWKWARD = [
    "plain",
    'it\'s "quoted" \\ back',
    "%s %% %(name)s {0} ?",
    "line\nbreak\r\n\ttab \x1f",
    "é ü ß — 你好 𝄞 😀",
    "",
    "x" * 5000,
    "'); DROP TABLE chat_message; --",
]


def check_against_orm() -> dict[str, Any]:
    """Store the same rows both ways in two rooms and compare everything; the counts checked.

    Runs in-process (SQLite) and in a script against PostgreSQL (``run_django_script``)."""
    tag = uuid.uuid4().hex[:8]
    alice = User.objects.create_user(f"alice-{tag}")
    bob = User.objects.create_user(f"bob-{tag}")
    fast_room = Room.objects.create(slug=f"fast-{tag}", title="fast")
    orm_room = Room.objects.create(slug=f"orm-{tag}", title="orm")
    rows = [
        NewMessage(
            seq=i + 1,
            user=(alice, bob)[i % 2],
            text=AWKWARD[i % len(AWKWARD)],
            client_id=f"c{i}" if i % 3 else "",
            status=("", "stopped", "error")[i % 3],
        )
        for i in range(40)
    ]
    with transaction.atomic():
        fast = batch_sql.insert_messages(fast_room, rows)
    with transaction.atomic():
        orm = batch_sql._bulk_create(orm_room, rows)

    names = [f.attname for f in Message._meta.concrete_fields]
    compared = [n for n in names if n not in ("id", "room_id", "created_at")]
    assert [m.seq for m in fast] == [r.seq for r in rows]  # in the order of the rows
    for made, other in zip(fast, orm, strict=True):
        stored = Message.objects.get(pk=made.pk)
        # The instance returned is what a load gives, field for field, with ids matched by seq.
        assert [getattr(made, n) for n in names] == [getattr(stored, n) for n in names]
        assert made._state.adding is False
        assert made._state.db == stored._state.db
        # And the same row as bulk_create's, but for its room and time.
        again = Message.objects.get(pk=other.pk)
        assert [getattr(stored, n) for n in compared] == [getattr(again, n) for n in compared]
        assert abs(stored.created_at - again.created_at) < timedelta(seconds=30)
        assert stored.created_at.tzinfo is not None
    with CaptureQueriesContext(connection) as queries:
        seen = [(m.user.username, m.room.slug) for m in fast]
    assert len(queries) == 0  # room and user are cached, as on the instances built before
    assert seen[0] == (alice.username, fast_room.slug)

    # Resends: only whole (user, client_id) keys match. Bob sent "c1" (seq 2), alice "c2"
    # (seq 3); the crossed pairs are new, whatever the query pairs up.
    keys = [(alice.pk, "c1"), (bob.pk, "c1"), (bob.pk, "c2"), (alice.pk, "c2"), (alice.pk, "")]
    found = batch_sql.stored_by_client_id(fast_room, keys)
    assert sorted(found, key=str) == sorted([(bob.pk, "c1"), (alice.pk, "c2")], key=str)
    assert found[(bob.pk, "c1")].seq == 2
    assert found[(alice.pk, "c2")].seq == 3
    # Asked only for the crossed pairs, the query still meets bob's c1 and alice's c2.
    assert batch_sql.stored_by_client_id(fast_room, [(alice.pk, "c1"), (bob.pk, "c2")]) == {}
    assert batch_sql.stored_by_client_id(orm_room, [(alice.pk, "")]) == {}

    # A seq already stored fails the whole statement: nothing of the batch is kept.
    clash = [NewMessage(41, alice, "new", "", ""), NewMessage(1, bob, "clash", "", "")]
    try:
        with transaction.atomic():
            batch_sql.insert_messages(fast_room, clash)
    except IntegrityError:
        pass
    else:
        raise AssertionError("a duplicate seq was stored")
    assert not Message.objects.filter(room=fast_room, seq=41).exists()
    return {"vendor": connection.vendor, "rows": len(fast), "found": len(found)}


@pytest.mark.django_db(transaction=True)
def test_sqlite_statement_gives_what_bulk_create_gave() -> None:
    assert connection.vendor == "sqlite"
    assert connection.features.can_return_rows_from_bulk_insert
    assert check_against_orm() == {"vendor": "sqlite", "rows": 40, "found": 2}


@pytest.mark.django_db(transaction=True)
def test_sqlite_batches_past_the_parameter_limit_take_several_statements() -> None:
    alice = User.objects.create_user("alice")
    bob = User.objects.create_user("bob")
    room = Room.objects.create(slug="big", title="big")
    width = len(batch_sql.VARYING) + len(batch_sql._Table.of(connection).constant)
    limit = connection.features.max_query_params
    assert limit is not None
    count = 2 * (limit // width) + 7  # three statements
    rows = [NewMessage(i + 1, (alice, bob)[i % 2], f"m{i}", f"c{i}", "") for i in range(count)]
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        made = batch_sql.insert_messages(room, rows)
    assert sum(q["sql"].startswith("INSERT") for q in queries) == 3
    assert [m.seq for m in made] == list(range(1, count + 1))
    stored = dict(Message.objects.filter(room=room).values_list("seq", "id"))
    assert [m.pk for m in made] == [stored[s] for s in range(1, count + 1)]

    # Looking up more keys than one query may hold: chunked too, and all found.
    keys = [(r.user.pk, r.client_id) for r in rows]
    keys += [(alice.pk, f"new{i}") for i in range(limit)]
    assert len(keys) > limit
    with CaptureQueriesContext(connection) as queries:
        found = batch_sql.stored_by_client_id(room, keys)
    assert len(found) == count
    assert sum("WHERE" in q["sql"] and "IN (" in q["sql"] for q in queries) >= 2


@pytest.mark.django_db(transaction=True)
def test_databases_without_returning_keep_bulk_create(monkeypatch: pytest.MonkeyPatch) -> None:
    features = type(connection.features)
    monkeypatch.setattr(features, "can_return_rows_from_bulk_insert", property(lambda _: False))
    alice = User.objects.create_user("alice")
    room = Room.objects.create(slug="old", title="old")
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        made = batch_sql.insert_messages(room, [NewMessage(1, alice, "hi", "c", "")])
    assert [(m.seq, m.text) for m in made] == [(1, "hi")]
    assert Message.objects.get(room=room, seq=1).text == "hi"
    # bulk_create's statement names the columns in the model's order (ours: VARYING first).
    insert = next(q["sql"] for q in queries if q["sql"].startswith("INSERT"))
    assert insert.index('"room_id"') < insert.index('"seq"')


@pytest.mark.postgres
def test_postgres_statement_gives_what_bulk_create_gave(postgres_env: dict[str, str]) -> None:
    script = (
        "import django, json\n"
        "django.setup()\n"
        "from tests.test_batch_sql import check_against_orm\n"
        "print(json.dumps(check_against_orm()))\n"
    )
    output = run_django_script(script, postgres_env)
    assert json.loads(output.strip().splitlines()[-1]) == {
        "vendor": "postgresql",
        "rows": 40,
        "found": 2,
    }
