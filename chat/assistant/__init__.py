"""The assistant of chat: room replies and the private panel.

- ``replies``: a room message starting with ``@assistant`` gets a reply streamed to the room;
- ``runs``: the takeover of room replies whose process died;
- ``protocol``: the assistant's frames and the panel's request and event shapes (pure);
- ``views``: the panel page and its Server-Sent Events endpoint;
- ``quotas``: the assistant's per-user limits (fail closed).

The model backends are ``chat.llm`` (a public dotted path: ``CHAT_LLM_BACKEND``).
"""
