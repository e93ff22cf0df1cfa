"""A Channels-tutorial chat (group_send + json.dumps per recipient) as a reference point.

The consumer is the one of the Channels tutorial (part 3, async), the ASGI application wraps it
the way the tutorial does, and ``views.events`` is the plain Django async streaming view a
tutorial would write for Server-Sent Events. Served by the same command as the project
(``bench.harness.SERVER_COMMAND``) with ``DJANGO_SETTINGS_MODULE=bench.tutorial.settings``.
"""
