"""The Twisted and autobahn protocols the runner (``realtime_kit.server``) gives daphne.

- ``BoundedHTTPChannel`` bounds what a client can make the server hold before the application
  sees a request: the request headers must be complete within a deadline from their first
  byte (Twisted's idle timeout restarts on every byte, so headers sent one byte at a time kept
  a connection for hours), and a body larger than a bound is refused with 413 before it is
  read, by its ``Content-Length`` or, for a chunked body, once it passes the bound (Twisted
  would otherwise spool the whole body to a temporary file first, whatever the view answers).
  Refused connections are answered, half-closed, and read for a moment while the client is
  still sending (see ``REFUSED_LINGER_SECONDS``).
- ``DrainingWebSocketProtocol`` can close with 1012 (service restart) and drops what the
  application sends after the server's close frame instead of raising into it.

Bounds apply to HTTP/1.1; an HTTP/2 connection (only with TLS endpoints and Twisted's h2
extra) is handled by Twisted's H2Connection without them.
"""

from __future__ import annotations

# Installs Twisted's asyncio reactor: it must come before anything imports the reactor.
import daphne.server  # noqa: F401  # isort: skip

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from autobahn.websocket.types import ConnectionDeny
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http

logger = logging.getLogger(__name__)

# WebSocket close code "Service Restart" (RFC 6455 registry): clients reconnect after a pause.
CLOSE_SERVICE_RESTART = 1012
SERVICE_RESTART_REASON = b"service restart"
# After refusing a request, keep reading (and dropping) what the client still sends this long
# before resetting the connection: a client busy uploading its body then reads the 413 instead
# of a connection reset. nginx's lingering close does the same (lingering_time 30 s); this is
# shorter because it only has to cover bodies small enough to be worth a readable error.
REFUSED_LINGER_SECONDS = 5.0


@dataclass(frozen=True)
class HTTPLimits:
    """What one HTTP/1.1 request may cost before the application sees it; 0 disables a bound."""

    max_body_bytes: int
    header_timeout_seconds: float


class ChannelRegistry(Protocol):
    """Where channels find their limits and report themselves (the runner's server)."""

    limits: HTTPLimits

    def channel_opened(self, channel: BoundedHTTPChannel) -> None: ...

    def channel_gone(self, channel: BoundedHTTPChannel) -> None: ...


class BoundedHTTPChannel(http.HTTPChannel):
    """Twisted's HTTP/1.1 channel with a header deadline, a body bound and a drain."""

    def __init__(self, registry: ChannelRegistry) -> None:
        super().__init__()
        self.registry = registry
        self.limits = registry.limits
        self.refused = False
        self.closing = False  # draining: no further request on this connection
        # Twisted DelayedCalls (its interfaces are zope ones, opaque to mypy).
        self._header_timer: Any = None
        self._linger: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.registry.channel_opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_header_timer()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self.registry.channel_gone(self)
        super().connectionLost(reason)

    # --- receiving -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return  # what a refused client still sends is read and dropped
        if self.line_mode and self._header_timer is None and self.limits.header_timeout_seconds:
            # The first bytes of a request (headers are read in line mode): from now on they
            # have a fixed time to be complete, however slowly they arrive.
            self._header_timer = self.callLater(
                self.limits.header_timeout_seconds, self._headers_too_slow
            )
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_header_timer()
        limit = self.limits.max_body_bytes
        if limit and self.length is not None and self.length > limit:
            # Before Twisted creates the body's file and before any "100 Continue".
            self.refuse(b"413 Content Too Large", f"The request body is limited to {limit} bytes.")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self.refused:  # a refused chunked body may still end: it reaches nobody
            super().allContentReceived()

    def body_received(self, total_bytes: int) -> bool:
        """Count a chunked body as it arrives; refuse it (and return False) past the bound."""
        limit = self.limits.max_body_bytes
        if limit and total_bytes > limit:
            self.refuse(b"413 Content Too Large", f"The request body is limited to {limit} bytes.")
            return False
        return not self.refused

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self.refuse(b"408 Request Timeout", "The request headers took too long to arrive.")

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None

    # --- refusing ----------------------------------------------------------------------------

    def refuse(self, status: bytes, message: str) -> None:
        """Answer ``status`` with a short text and close the connection (idempotent)."""
        transport: Any = self.transport
        if self.refused or transport is None:
            return
        self.refused = True
        self._cancel_header_timer()
        self.setTimeout(None)
        # INFO, not WARNING: a client can cause as many of these as it likes.
        logger.info("Refused a request from %s: %s", _peer(transport), status.decode())
        body = (message + "\n").encode()
        head = b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n" % status
        head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        transport.write(head + body)
        self._networkProducer.unregisterProducer()
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        # The answer and a FIN go out; reading goes on (dropped) until the client closes or
        # the linger ends.
        half_close()
        self._linger = self.callLater(REFUSED_LINGER_SECONDS, transport.abortConnection)

    # --- draining ----------------------------------------------------------------------------

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self.closing:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def drain(self) -> None:
        """Close now if no request is under way, else once the requests under way are answered.

        A request still arriving (headers or body) may finish and be served: its header
        deadline, and the drain timeout, bound how long that takes.
        """
        self.closing = True
        if not self.requests:
            self.loseConnection()
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])


class BoundedWebRequest(WebRequest):
    """Daphne's request, counting a chunked body against the channel's bound."""

    _body_bytes = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        channel = self.channel
        if isinstance(channel, BoundedHTTPChannel) and not channel.body_received(self._body_bytes):
            return
        super().handleContentChunk(data)

    def process(self) -> Any:
        result = super().process()
        # Daphne hands an upgraded connection to a WebSocket protocol and clears our
        # transport: the channel no longer speaks HTTP and must not be drained as such.
        if self.transport is None and isinstance(self.channel, BoundedHTTPChannel):
            self.channel.registry.channel_gone(self.channel)
        return result


class BoundedHTTPFactory(HTTPFactory):
    """Daphne's HTTP factory, building ``BoundedHTTPChannel`` and ``BoundedWebRequest``."""

    def __init__(self, server: Any, registry: ChannelRegistry) -> None:
        super().__init__(server)
        self.registry = registry

    def protocol(self) -> Any:  # Twisted's Factory.buildProtocol calls self.protocol()
        # Twisted's own wrapper, so that ALPN-negotiated HTTP/2 still works on TLS endpoints.
        return http._GenericHTTPChannelProtocol(BoundedHTTPChannel(self.registry))

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = BoundedWebRequest
        return protocol


class DrainingWebSocketProtocol(WebSocketProtocol):
    """Daphne's WebSocket protocol, with a restart close and quiet sends after a close."""

    def handle_reply(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "websocket.send" and self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
            # After our close frame (a restart, a 1009) autobahn refuses to send and would
            # raise into the application; drop it, as daphne does once the socket is gone.
            return
        if kind == "websocket.accept" and not hasattr(self, "handshake_deferred"):
            return  # the handshake was already refused (a restart came first)
        super().handle_reply(message)

    def close_for_restart(self) -> None:
        """Close with 1012, or refuse a handshake still waiting for the application (503)."""
        if self.state == self.STATE_OPEN:
            # Protocol level: autobahn's sendClose accepts only 1000 and 3000-4999 from an
            # application; sendCloseFrame is the path autobahn uses for its own codes.
            self.sendCloseFrame(
                code=CLOSE_SERVICE_RESTART, reasonUtf8=SERVICE_RESTART_REASON, isReply=False
            )
        elif self.state == self.STATE_CONNECTING:
            deferred = getattr(self, "handshake_deferred", None)
            if deferred is None:
                self.dropConnection(abort=True)
                return
            del self.handshake_deferred
            deferred.errback(ConnectionDeny(code=503, reason="Service restarting"))


class DrainingWebSocketFactory(WebSocketFactory):
    """Daphne's WebSocket factory: our protocol, and failures that send their close code."""

    protocol = DrainingWebSocketProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # autobahn fails a connection (message too big 1009, protocol error 1002, invalid UTF-8
        # 1007) by dropping TCP by default, so clients saw 1006 and could not tell why. With
        # this it sends the close frame; a peer that does not answer is dropped after
        # closeHandshakeTimeout (1 s). Daphne's own setProtocolOptions call leaves it alone.
        self.setProtocolOptions(failByDrop=False)


def _peer(transport: Any) -> str:
    peer = transport.getPeer()
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)
