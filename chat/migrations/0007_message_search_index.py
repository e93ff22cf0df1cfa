"""The full-text index of message texts, on PostgreSQL only (chat/search.py queries it with
the same expression; other databases search by substring and get no index)."""

from django.db import migrations

INDEX = "chat_message_text_fts"
CREATE = (
    f"CREATE INDEX IF NOT EXISTS {INDEX} ON chat_message "
    "USING gin (to_tsvector('simple'::regconfig, text))"
)


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0006_room_owner'),
    ]

    operations = [
        migrations.RunPython(create_index, drop_index, elidable=False),
    ]
