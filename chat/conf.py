"""Settings of the chat app: one prefixed object, read lazily so override_settings works.

Every setting is documented in docs/settings.md. Hosts set them in their Django settings as
``CHAT_<NAME>``; nothing here is read at import time.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings


class ChatSettings:
    prefix = "CHAT_"

    def _get(self, name: str, default: Any) -> Any:
        return getattr(settings, self.prefix + name, default)

    @property
    def WEBSOCKET_PREFIX(self) -> str:
        """Path of the room sockets before the slug, without a leading slash (``ws/chat/``)."""
        return str(self._get("WEBSOCKET_PREFIX", "ws/chat/"))

    @property
    def HISTORY_LIMIT(self) -> int:
        """Messages sent on connect when the client gives no ``after``."""
        return int(self._get("HISTORY_LIMIT", 50))

    @property
    def HISTORY_PAGE_SIZE(self) -> int:
        """Messages per page of ``GET /chat/<slug>/messages/`` when the client gives no limit."""
        return int(self._get("HISTORY_PAGE_SIZE", 50))

    @property
    def HISTORY_PAGE_MAX(self) -> int:
        """Largest ``limit`` that ``GET /chat/<slug>/messages/`` honours (larger ones are cut)."""
        return int(self._get("HISTORY_PAGE_MAX", 100))

    @property
    def EXPORT_PAGE_SIZE(self) -> int:
        """Messages per database query (and per streamed chunk) of an export."""
        return int(self._get("EXPORT_PAGE_SIZE", 2000))

    @property
    def EXPORT_MAX_CONCURRENT_PER_USER(self) -> int:
        """Exports a user may have downloading at once (all processes with CHAT_REDIS_URL)."""
        return int(self._get("EXPORT_MAX_CONCURRENT_PER_USER", 2))

    @property
    def MAX_TEXT_LENGTH(self) -> int:
        """Longest message text, in characters."""
        return int(self._get("MAX_TEXT_LENGTH", 4000))

    @property
    def MAX_FRAME_BYTES(self) -> int:
        """Largest WebSocket message the consumer accepts, in bytes (UTF-8)."""
        return int(self._get("MAX_FRAME_BYTES", 64 * 1024))

    @property
    def MAX_TEXT_BYTES(self) -> int:
        """Largest message text as it travels in a frame: UTF-8 bytes with JSON escapes."""
        return int(self._get("MAX_TEXT_BYTES", 16 * 1024))

    @property
    def MAX_SEND_BYTES(self) -> int:
        """Largest WebSocket message the server sends, in bytes. History, replays and
        batches are packed within it. Keep it within what clients accept (browsers: no
        limit; the ``websockets`` client: 1 MiB by default). Daphne applies
        ``--websocket-max-message-size`` to what autobahn's ``sendMessage`` sends (over it:
        close 1011), but the chat writer frames its messages itself, so only the clients'
        limits bind; uvicorn limits incoming messages only."""
        return int(self._get("MAX_SEND_BYTES", 64 * 1024))

    @property
    def MAX_OUTBOUND_BYTES(self) -> int:
        """Bytes a socket may have sent but not yet taken by its client; past it the socket is
        closed with 4008 (the client reconnects and resumes). Typing frames are dropped for
        a socket past a quarter of it."""
        return int(self._get("MAX_OUTBOUND_BYTES", 1024 * 1024))

    @property
    def MAX_INBOUND_BYTES(self) -> int:
        """Bytes of client messages that may wait for the consumer; past it the server stops
        reading that client's socket until half of it is handled (daphne)."""
        return int(self._get("MAX_INBOUND_BYTES", 256 * 1024))

    @property
    def BATCH_WINDOW_MILLISECONDS(self) -> float:
        """How long room frames wait to be sent together as one message, in milliseconds."""
        return float(self._get("BATCH_WINDOW_MILLISECONDS", 5.0))

    @property
    def GAP_GRACE_MILLISECONDS(self) -> float:
        """How long a process waits for a missing seq (published by another process) before
        reading it from the database, in milliseconds."""
        return float(self._get("GAP_GRACE_MILLISECONDS", 50.0))

    @property
    def METRICS_TOKEN(self) -> str:
        """Bearer token a Prometheus scraper sends to ``chat.views.metrics`` ('' = staff
        sessions only). Never logged."""
        return str(self._get("METRICS_TOKEN", "") or "")

    @property
    def MAX_FRAMES_PER_MESSAGE(self) -> int:
        """Most frames a client may batch in one WebSocket message (a JSON array)."""
        return int(self._get("MAX_FRAMES_PER_MESSAGE", 50))

    @property
    def RATE_LIMIT_MESSAGES(self) -> int:
        """Messages a user may send (all rooms together) per rate window."""
        return int(self._get("RATE_LIMIT_MESSAGES", 10))

    @property
    def RATE_LIMIT_WINDOW_SECONDS(self) -> float:
        """Length of the sliding rate-limit window, in seconds."""
        return float(self._get("RATE_LIMIT_WINDOW_SECONDS", 5.0))

    @property
    def MAX_MENTIONS(self) -> int:
        """Most users one message's ``@username`` mentions notify (the first mentioned)."""
        return int(self._get("MAX_MENTIONS", 5))

    @property
    def MENTION_RATE_LIMIT(self) -> int:
        """Most mention notifications one sender's messages cause per window, all processes."""
        return int(self._get("MENTION_RATE_LIMIT", 20))

    @property
    def MENTION_RATE_LIMIT_WINDOW_SECONDS(self) -> float:
        """Length of the sliding window of ``MENTION_RATE_LIMIT``, in seconds."""
        return float(self._get("MENTION_RATE_LIMIT_WINDOW_SECONDS", 60.0))

    @property
    def GROUP_COMMIT_MAX_MESSAGES(self) -> int:
        """Most concurrent sends of one room stored in one transaction (chat/ingest.py);
        1 stores each send in its own transaction."""
        return int(self._get("GROUP_COMMIT_MAX_MESSAGES", 100))

    @property
    def LAYER_BATCH_MAX_BYTES(self) -> int:
        """Most text (UTF-8 bytes) in one channel-layer message carrying several messages of a
        group commit (``chat.events``); one over it goes alone. 0: every message alone, as
        before ``chat.events`` existed (for a rolling upgrade from such a version)."""
        return int(self._get("LAYER_BATCH_MAX_BYTES", 256 * 1024))

    @property
    def MAX_PENDING_SENDS(self) -> int:
        """Most sends of one socket in flight (stored or being stored, not answered yet); at
        it the socket's next frame waits for the oldest (chat/consumers.py)."""
        return int(self._get("MAX_PENDING_SENDS", 20))

    @property
    def EDIT_RATE_LIMIT(self) -> int:
        """Edits and deletes a user may make (all rooms and tabs together) per edit window."""
        return int(self._get("EDIT_RATE_LIMIT", 10))

    @property
    def EDIT_RATE_LIMIT_WINDOW_SECONDS(self) -> float:
        """Length of the sliding window of ``EDIT_RATE_LIMIT``, in seconds."""
        return float(self._get("EDIT_RATE_LIMIT_WINDOW_SECONDS", 5.0))

    @property
    def REPLAY_BATCH_SIZE(self) -> int:
        """Messages per database page and per WebSocket message when replaying history."""
        return int(self._get("REPLAY_BATCH_SIZE", 200))

    @property
    def PONG_SEQ_MAX_AGE_SECONDS(self) -> float:
        """How stale the ``last_seq`` in a pong may be (one read per room per interval)."""
        return float(self._get("PONG_SEQ_MAX_AGE_SECONDS", 2.0))

    @property
    def PRESENCE_STORE(self) -> str:
        """Dotted path of the presence store class (memory for one process, Redis for many)."""
        return str(self._get("PRESENCE_STORE", "chat.presence_stores.memory.MemoryPresenceStore"))

    @property
    def PRESENCE_REDIS_URL(self) -> str:
        """Redis URL of ``RedisPresenceStore``."""
        return str(self._get("PRESENCE_REDIS_URL", "redis://127.0.0.1:6379/0"))

    @property
    def PRESENCE_KEY_PREFIX(self) -> str:
        """Prefix of the presence store's Redis keys (to share one Redis between sites)."""
        return str(self._get("PRESENCE_KEY_PREFIX", "chat:presence"))

    @property
    def PRESENCE_TIMEOUT_SECONDS(self) -> float:
        """Longest time a crashed process's users stay listed as present, in seconds."""
        return float(self._get("PRESENCE_TIMEOUT_SECONDS", 60.0))

    @property
    def PRESENCE_SETTLE_SECONDS(self) -> float:
        """Wait after a first presence change to gather a burst into one diff, in seconds."""
        return float(self._get("PRESENCE_SETTLE_SECONDS", 0.05))

    @property
    def PRESENCE_MIN_INTERVAL_SECONDS(self) -> float:
        """Shortest time between two presence diffs of a room, in seconds."""
        return float(self._get("PRESENCE_MIN_INTERVAL_SECONDS", 0.25))

    @property
    def TYPING_THROTTLE_SECONDS(self) -> float:
        """Shortest time between two relayed ``typing`` (active) frames of a user, in seconds."""
        return float(self._get("TYPING_THROTTLE_SECONDS", 2.0))

    @property
    def READ_THROTTLE_SECONDS(self) -> float:
        """Shortest time between two stored and relayed read markers of a socket, in seconds."""
        return float(self._get("READ_THROTTLE_SECONDS", 1.0))

    @property
    def READ_STATE_LIMIT(self) -> int:
        """Read markers sent on connect (most recently updated first)."""
        return int(self._get("READ_STATE_LIMIT", 100))

    # --- per-user limits (chat/quotas.py) ------------------------------------------------

    @property
    def REDIS_URL(self) -> str:
        """Redis where per-user limits are counted for every process ('' : in this process)."""
        return str(self._get("REDIS_URL", "") or "")

    @property
    def REDIS_KEY_PREFIX(self) -> str:
        """Prefix of those Redis keys (to share one Redis between sites)."""
        return str(self._get("REDIS_KEY_PREFIX", "chat:limits"))

    @property
    def LEASE_TTL_SECONDS(self) -> float:
        """How long a crashed process's sockets and replies keep counting, in seconds."""
        return float(self._get("LEASE_TTL_SECONDS", 30.0))

    @property
    def MAX_SOCKETS_PER_USER(self) -> int:
        """Chat WebSockets one user may have open at once (all processes with
        ``CHAT_REDIS_URL``); more are closed with 4429."""
        return int(self._get("MAX_SOCKETS_PER_USER", 20))

    # --- assistant (chat/llm, chat/assistant/, the /chat/assistant/ endpoint) -----------

    @property
    def ASSISTANT_BACKEND(self) -> str:
        """Dotted path of the LLM backend class (a ``chat.llm.base.BaseLLMBackend``)."""
        return str(self._get("ASSISTANT_BACKEND", "chat.llm.demo.DemoBackend"))

    @property
    def ASSISTANT_USERNAME(self) -> str:
        """Username of the user that room replies are stored as (created on first use)."""
        return str(self._get("ASSISTANT_USERNAME", "assistant"))

    @property
    def ASSISTANT_SYSTEM_PROMPT(self) -> str:
        """System message put before the room history of a room reply ('' for none)."""
        return str(
            self._get(
                "ASSISTANT_SYSTEM_PROMPT",
                "You are a helpful assistant taking part in a group chat. Messages from room "
                "members are prefixed with their username. Answer the last one, briefly.",
            )
        )

    @property
    def ASSISTANT_MAX_REQUEST_BYTES(self) -> int:
        """Largest body of ``POST /chat/assistant/stream/``, in bytes."""
        return int(self._get("ASSISTANT_MAX_REQUEST_BYTES", 128 * 1024))

    @property
    def ASSISTANT_MAX_MESSAGES(self) -> int:
        """Most messages in one ``POST /chat/assistant/stream/`` request."""
        return int(self._get("ASSISTANT_MAX_MESSAGES", 50))

    @property
    def ASSISTANT_MAX_CONTENT_CHARS(self) -> int:
        """Longest ``content`` of one message of a stream request, in characters."""
        return int(self._get("ASSISTANT_MAX_CONTENT_CHARS", 8000))

    @property
    def ASSISTANT_CONTEXT_MESSAGES(self) -> int:
        """Room messages (the request included) sent to the model as a room reply's context."""
        return int(self._get("ASSISTANT_CONTEXT_MESSAGES", 20))

    @property
    def ASSISTANT_CONTEXT_CHARS(self) -> int:
        """Most characters of room history in a reply's context (oldest dropped first)."""
        return int(self._get("ASSISTANT_CONTEXT_CHARS", 12000))

    @property
    def ASSISTANT_MAX_REPLY_CHARS(self) -> int:
        """Longest room reply, in characters; a longer one is cut and stored as an error."""
        return int(self._get("ASSISTANT_MAX_REPLY_CHARS", 16000))

    @property
    def ASSISTANT_COALESCE_SECONDS(self) -> float:
        """Longest time a room reply's text waits to be sent with later deltas, in seconds."""
        return float(self._get("ASSISTANT_COALESCE_SECONDS", 0.05))

    @property
    def ASSISTANT_COALESCE_CHARS(self) -> int:
        """Waiting reply text of at least this many characters is sent at once."""
        return int(self._get("ASSISTANT_COALESCE_CHARS", 256))

    @property
    def ASSISTANT_MAX_CONCURRENT_PER_USER(self) -> int:
        """Room replies one user may have running at once (all processes with REDIS_URL)."""
        return int(self._get("ASSISTANT_MAX_CONCURRENT_PER_USER", 1))

    @property
    def ASSISTANT_RATE_LIMIT_REPLIES(self) -> int:
        """Room replies one user may request per window (all rooms and processes)."""
        return int(self._get("ASSISTANT_RATE_LIMIT_REPLIES", 5))

    @property
    def ASSISTANT_RATE_LIMIT_WINDOW_SECONDS(self) -> float:
        """Length of the sliding window of ``ASSISTANT_RATE_LIMIT_REPLIES``, in seconds."""
        return float(self._get("ASSISTANT_RATE_LIMIT_WINDOW_SECONDS", 60.0))

    @property
    def ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER(self) -> int:
        """Private panel streams one user may have open at once (all processes with REDIS_URL)."""
        return int(self._get("ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER", 2))

    @property
    def ASSISTANT_PANEL_RATE_LIMIT(self) -> int:
        """Private panel streams one user may start per window (all processes with REDIS_URL)."""
        return int(self._get("ASSISTANT_PANEL_RATE_LIMIT", 20))

    @property
    def ASSISTANT_PANEL_RATE_LIMIT_WINDOW_SECONDS(self) -> float:
        """Length of the sliding window of ``ASSISTANT_PANEL_RATE_LIMIT``, in seconds."""
        return float(self._get("ASSISTANT_PANEL_RATE_LIMIT_WINDOW_SECONDS", 60.0))

    @property
    def ASSISTANT_HEARTBEAT_SECONDS(self) -> float:
        """How often a running room reply records its text so far and that its process is
        alive (one UPDATE per reply), in seconds."""
        return float(self._get("ASSISTANT_HEARTBEAT_SECONDS", 1.0))

    @property
    def ASSISTANT_TAKEOVER_SECONDS(self) -> float:
        """A running room reply whose process has not recorded it for this long (the process
        died) is stored as ``interrupted`` by another process, in seconds."""
        return float(self._get("ASSISTANT_TAKEOVER_SECONDS", 5.0))

    @property
    def ASSISTANT_DEMO_DELAY_SECONDS(self) -> float:
        """Pause before each token of the offline demo backend, in seconds."""
        return float(self._get("ASSISTANT_DEMO_DELAY_SECONDS", 0.03))

    @property
    def LLM_API_KEY(self) -> str:
        """API key of the OpenAI-compatible server. Never sent to browsers or logged."""
        return str(self._get("LLM_API_KEY", "") or "")

    @property
    def LLM_BASE_URL(self) -> str:
        """Base URL of an OpenAI-compatible server ('' for api.openai.com)."""
        return str(self._get("LLM_BASE_URL", "") or "")

    @property
    def LLM_MODEL(self) -> str:
        """Model name sent with every request."""
        return str(self._get("LLM_MODEL", "gpt-4o-mini"))

    @property
    def LLM_MAX_TOKENS(self) -> int:
        """``max_tokens`` of every request (0: not sent, the server's default)."""
        return int(self._get("LLM_MAX_TOKENS", 1024))

    @property
    def LLM_CONNECT_TIMEOUT_SECONDS(self) -> float:
        """Longest wait for a TCP/TLS connection to the model server, in seconds."""
        return float(self._get("LLM_CONNECT_TIMEOUT_SECONDS", 5.0))

    @property
    def LLM_FIRST_TOKEN_TIMEOUT_SECONDS(self) -> float:
        """Longest wait from the request to the first token (retries included), in seconds."""
        return float(self._get("LLM_FIRST_TOKEN_TIMEOUT_SECONDS", 30.0))

    @property
    def LLM_IDLE_TIMEOUT_SECONDS(self) -> float:
        """Longest wait between two chunks once a reply has started, in seconds."""
        return float(self._get("LLM_IDLE_TIMEOUT_SECONDS", 20.0))

    @property
    def LLM_MAX_RETRIES(self) -> int:
        """Retries of a failed initial request (429, 5xx, connection errors); never mid-stream."""
        return int(self._get("LLM_MAX_RETRIES", 1))

    @property
    def ROOM_CREATORS(self) -> str:
        """Who may create rooms in the app: ``"authenticated"`` (any logged-in user) or
        ``"staff"``. Anything else is a system check error (chat.E030)."""
        return str(self._get("ROOM_CREATORS", "authenticated"))

    @property
    def MAX_OWNED_ROOMS(self) -> int:
        """Rooms one user may own (create in the app); staff have no limit."""
        return int(self._get("MAX_OWNED_ROOMS", 50))

    @property
    def ROOM_LIST_POLL_SECONDS(self) -> float:
        """How often the room list page asks ``GET /chat/api/rooms/`` for unread counts and
        new rooms, in seconds."""
        return float(self._get("ROOM_LIST_POLL_SECONDS", 10.0))

    @property
    def ROOM_LIST_PAGE_SIZE(self) -> int:
        """Rooms per page of ``GET /chat/api/rooms/`` and of the room list page (most)."""
        return int(self._get("ROOM_LIST_PAGE_SIZE", 200))

    @property
    def SEARCH_PAGE_SIZE(self) -> int:
        """Results per page of the search endpoints when the client gives no ``limit``."""
        return int(self._get("SEARCH_PAGE_SIZE", 20))

    @property
    def SEARCH_PAGE_MAX(self) -> int:
        """Largest ``limit`` the search endpoints honour (larger ones are cut)."""
        return int(self._get("SEARCH_PAGE_MAX", 50))

    @property
    def SEARCH_MAX_QUERY_BYTES(self) -> int:
        """Longest search query ``q``, in UTF-8 bytes; a longer one is refused (400)."""
        return int(self._get("SEARCH_MAX_QUERY_BYTES", 400))

    @property
    def SEARCH_RATE_LIMIT(self) -> int:
        """Searches a user may run (both endpoints, all rooms and tabs) per search window."""
        return int(self._get("SEARCH_RATE_LIMIT", 30))

    @property
    def SEARCH_RATE_LIMIT_WINDOW_SECONDS(self) -> float:
        """Length of the sliding window of ``SEARCH_RATE_LIMIT``, in seconds."""
        return float(self._get("SEARCH_RATE_LIMIT_WINDOW_SECONDS", 60.0))


app_settings = ChatSettings()
