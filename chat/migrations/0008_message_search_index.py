"""The full-text index of message texts, on PostgreSQL only (chat/search.py queries it with
the same expression; other databases search by substring and get no index).

Built CONCURRENTLY, so that migrating a site with millions of messages does not block sends
while the index builds (minutes at that size); that needs a migration outside a transaction.
A build that failed leaves an invalid index behind, which is dropped and built again."""

from django.db import migrations

INDEX = "chat_message_text_fts"
CREATE = (
    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON chat_message "
    "USING gin (to_tsvector('simple'::regconfig, text))"
)
INVALID = (
    "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE c.relname = %s AND NOT i.indisvalid"
)


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(INVALID, [INDEX])
        if cursor.fetchone():
            cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        cursor.execute(CREATE)


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('chat', '0007_room_owner'),
    ]

    operations = [
        migrations.RunPython(create_index, drop_index, elidable=False),
    ]
