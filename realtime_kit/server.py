"""Daphne with a graceful drain on SIGTERM and bounds on HTTP requests.

Run it as daphne, with daphne's own options and a few more::

    python -m realtime_kit.server -b 127.0.0.1 -p 8000 --websocket-max-message-size 65536 \\
        [--drain-timeout 10] [--max-request-body-bytes 4194304] [--request-header-timeout 10] \\
        project.asgi:application

On SIGTERM or SIGINT (a second one stops at once) it drains, in this order:

1. stops listening on every endpoint at once: new connections are refused;
2. closes idle keep-alive HTTP connections; busy ones close after their current response;
3. runs ``realtime_kit.drain.begin_drain()``: SSE streams end their bodies normally and
   the apps' callbacks run (room assistant replies are stored as interrupted, and their
   ``assistant.end`` broadcast);
4. closes every WebSocket with 1012 (service restart), from the protocol;
5. waits until every connection is gone and every application instance has returned, at
   most ``--drain-timeout`` seconds from the signal; then stops the reactor (daphne cancels
   what is left) and exits with status 0.

Plain daphne 4.2.3 stops the reactor at once instead: WebSockets get no close frame, SSE
bodies are cut mid-stream, and with a stream open the process dies of SIGSEGV (see ``main``).
``realtime_kit.protocols`` has the HTTP bounds and the WebSocket protocol; docs/deployment.md
("Drain on deploy", "HTTP limits") has what clients see and what was measured.
"""

from __future__ import annotations

# Installs Twisted's asyncio reactor: it must come before anything imports the reactor.
import daphne.server  # isort: skip

import argparse
import asyncio
import contextvars
import functools
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from daphne import cli
from twisted.internet import defer, reactor

from . import drain
from .protocols import (
    BoundedHTTPChannel,
    BoundedHTTPFactory,
    DrainingWebSocketFactory,
    DrainingWebSocketProtocol,
    HTTPLimits,
)

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_SECONDS = 10.0
DRAIN_TIMEOUT_ENV = "REALTIME_DRAIN_TIMEOUT_SECONDS"
# 4 MiB: above Django's DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB), the largest body the apps here
# accept (the assistant endpoint takes 128 KiB; nothing uploads files), so Django keeps
# answering what it answers today, while a body that nothing would accept costs at most
# 4 MiB of temporary file instead of unbounded disk. Sites with uploads raise it.
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024
# From the first byte of a request to the end of its headers. Headers fit in one or two TCP
# segments: 10 s covers three lost segments in a row (retransmits after 1 + 2 + 4 s). Behind a
# proxy it never matters: the proxy sends whole requests.
DEFAULT_REQUEST_HEADER_TIMEOUT_SECONDS = 10.0
# Frames the drain callbacks broadcast (assistant.end) go through the channel layer (through
# Redis and back, with REDIS_URL) to this process's consumers: give them this long to reach
# the sockets before the sockets close.
BROADCAST_SETTLE_SECONDS = 0.25
# Kept out of the callbacks' share of the drain timeout: the settle time above, and the
# closing handshake (autobahn drops a client that does not answer within 1 s).
WEBSOCKET_CLOSE_RESERVE_SECONDS = 1.5
MIN_CALLBACK_SECONDS = 0.5
DRAIN_POLL_SECONDS = 0.05
# Applications still running when the reactor stops are cancelled; this long is allowed for
# them to finish, so one that ignores the cancellation cannot hold the exit.
KILL_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class RunnerOptions:
    drain_timeout_seconds: float
    limits: HTTPLimits


@dataclass(frozen=True)
class Open:
    """What a drain still waits for."""

    http_connections: int
    websockets: int
    applications: int  # application instances that have not returned

    def __bool__(self) -> bool:
        return bool(self.http_connections or self.websockets or self.applications)


class DrainingServer(daphne.server.Server):
    """Daphne's server with our factories, our signal handlers and the drain."""

    def __init__(self, *args: Any, options: RunnerOptions, **kwargs: Any) -> None:
        # Twisted's handlers would stop the reactor at once; ours drain first.
        super().__init__(*args, signal_handlers=False, **kwargs)
        self.options = options
        self.limits = options.limits
        self.http_channels: set[BoundedHTTPChannel] = set()
        self.ports: list[Any] = []
        self.listen_failed = False
        self._drain_task: asyncio.Task[None] | None = None
        self._stopping = False

    # Daphne's run() builds its two factories inline; these setters swap in ours, so the rest
    # of run() (endpoints, protocol options, timers, logging) stays daphne's own.

    @property
    def http_factory(self) -> BoundedHTTPFactory:
        return self._http_factory

    @http_factory.setter
    def http_factory(self, _daphne_factory: Any) -> None:
        self._http_factory = BoundedHTTPFactory(self, self)

    @property
    def ws_factory(self) -> DrainingWebSocketFactory:
        return self._ws_factory

    @ws_factory.setter
    def ws_factory(self, _daphne_factory: Any) -> None:
        self._ws_factory = DrainingWebSocketFactory(self, server=self.server_name)

    def run(self) -> None:
        reactor.callWhenRunning(self._on_reactor_running)
        super().run()

    def listen_success(self, port: Any) -> None:
        self.ports.append(port)
        super().listen_success(port)
        # `make run` says "ready" here, once the socket accepts connections, not before.
        print(f"ready: {ready_line(port.getHost())}", flush=True)

    def listen_error(self, failure: Any) -> None:
        self.listen_failed = True
        super().listen_error(failure)

    # --- ChannelRegistry (realtime_kit.protocols) --------------------------------------------

    def channel_opened(self, channel: BoundedHTTPChannel) -> None:
        self.http_channels.add(channel)
        if self._drain_task is not None:
            channel.drain()  # accepted just before the port closed

    def channel_gone(self, channel: BoundedHTTPChannel) -> None:
        self.http_channels.discard(channel)

    # --- the drain -----------------------------------------------------------------------------

    def _on_reactor_running(self) -> None:
        if not (hasattr(self, "_http_factory") and hasattr(self, "_ws_factory")):
            # A daphne that builds its factories differently: our bounds and drain would
            # silently not apply. Refuse to serve instead.
            logger.critical("This daphne did not take the runner's factories; stopping")
            self.listen_failed = True
            self.stop()
            return
        self._install_signal_handlers()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_event_loop()  # daphne made the reactor's loop the current one
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._drain_task is None:
            timeout = self.options.drain_timeout_seconds
            logger.info("%s: draining, for at most %g s", name, timeout)
            loop = asyncio.get_running_loop()
            self._drain_task = loop.create_task(self._drain(), context=contextvars.Context())
        else:
            logger.warning("%s again: stopping without waiting for open connections", name)
            self.stop()

    def stop(self) -> None:
        # Once: the drain's end and a second signal may both ask (Twisted refuses a second stop).
        if not self._stopping:
            self._stopping = True
            super().stop()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.options.drain_timeout_seconds
        try:
            for port in self.ports:
                port.stopListening()
            for channel in list(self.http_channels):
                channel.drain()
            budget = deadline - loop.time() - WEBSOCKET_CLOSE_RESERVE_SECONDS
            await drain.begin_drain(max(budget, MIN_CALLBACK_SECONDS))
            await asyncio.sleep(BROADCAST_SETTLE_SECONDS)
            self._close_websockets()
            # Polled: daphne says nothing when an application instance returns (its own
            # application_checker polls too, every second).
            while self.open() and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(DRAIN_POLL_SECONDS)
        except Exception:
            logger.exception("Draining failed")
        finally:
            self._log_end(loop.time() - started)
            self.stop()

    def _close_websockets(self) -> None:
        for protocol in list(self.connections):
            if isinstance(protocol, DrainingWebSocketProtocol):
                protocol.close_for_restart()

    def open(self) -> Open:
        """The connections and application instances still open."""
        sockets = applications = 0
        for protocol, details in self.connections.items():
            if isinstance(protocol, DrainingWebSocketProtocol) and "disconnected" not in details:
                sockets += 1
            instance = details.get("application_instance")
            if instance is not None and not instance.done():
                applications += 1
        return Open(len(self.http_channels), sockets, applications)

    def _log_end(self, seconds: float) -> None:
        left = self.open()
        if not left:
            logger.info("Drained in %.2f s", seconds)
            return
        logger.warning(
            "Drain timeout after %.2f s: %d HTTP connections, %d WebSockets and %d application "
            "instances left; stopping anyway",
            seconds,
            left.http_connections,
            left.websockets,
            left.applications,
        )

    def kill_all_applications(self) -> defer.Deferred[None]:
        """Cancel the application instances still running; wait for them, but not forever."""
        # Daphne's own version assumes every connection has an application (a request still
        # receiving its headers has none yet) and waits without bound.
        running = [
            details["application_instance"]
            for details in self.connections.values()
            if details.get("application_instance") is not None
            and not details["application_instance"].done()
        ]
        for instance in running:
            instance.cancel()
        if running:
            logger.info("Cancelled %d application instances", len(running))
        waited: defer.Deferred[Any] = defer.Deferred.fromFuture(
            asyncio.gather(*running, return_exceptions=True)
        )
        waited.addTimeout(KILL_GRACE_SECONDS, reactor)
        waited.addErrback(lambda _failure: None)
        return waited


# --- command line ------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return value


def _bytes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of bytes >= 0, not {text!r}")
    return value


def _default_drain_timeout() -> float:
    raw = os.environ.get(DRAIN_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_DRAIN_TIMEOUT_SECONDS
    try:
        return _seconds(raw)
    except (ValueError, argparse.ArgumentTypeError):
        sys.exit(f"{DRAIN_TIMEOUT_ENV}={raw!r}: give a number of seconds >= 0.")


class CommandLineInterface(cli.CommandLineInterface):
    """Daphne's command line, plus the drain and the HTTP bounds."""

    description = "Daphne with a graceful drain on SIGTERM and bounds on HTTP requests"

    def __init__(self) -> None:
        super().__init__()
        self.parser.prog = "python -m realtime_kit.server"
        self.parser.add_argument(
            "--drain-timeout",
            type=_seconds,
            default=_default_drain_timeout(),
            help="Seconds a SIGTERM waits for connections to end before stopping "
            f"(default {DEFAULT_DRAIN_TIMEOUT_SECONDS:g}, or ${DRAIN_TIMEOUT_ENV}).",
        )
        self.parser.add_argument(
            "--max-request-body-bytes",
            type=_bytes,
            default=DEFAULT_MAX_REQUEST_BODY_BYTES,
            help="Refuse (413) request bodies larger than this before reading them "
            f"(default {DEFAULT_MAX_REQUEST_BODY_BYTES}; 0 disables).",
        )
        self.parser.add_argument(
            "--request-header-timeout",
            type=_seconds,
            default=DEFAULT_REQUEST_HEADER_TIMEOUT_SECONDS,
            help="Seconds from a request's first byte to the end of its headers before it "
            f"is refused (408) (default {DEFAULT_REQUEST_HEADER_TIMEOUT_SECONDS:g}; 0 disables).",
        )

    def run(self, args: list[str]) -> None:
        parsed = self.parser.parse_args(args)
        options = RunnerOptions(
            drain_timeout_seconds=parsed.drain_timeout,
            limits=HTTPLimits(
                max_body_bytes=parsed.max_request_body_bytes,
                header_timeout_seconds=parsed.request_header_timeout,
            ),
        )
        self.server_class = functools.partial(DrainingServer, options=options)
        super().run(args)


def ready_line(address: Any) -> str:
    """What the console shows once ``address`` (a Twisted address) listens."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:  # a UNIX socket or a file descriptor
        return f"listening on {address} (Ctrl-C to stop)"
    shown = f"[{host}]" if ":" in host else host
    return f"serving http://{shown}:{port}/ (Ctrl-C to stop)"


def main(argv: list[str] | None = None) -> None:
    """Run the server; exit 0 after a drain, 1 if an endpoint could not listen."""
    interface = CommandLineInterface()
    code: Any = 0
    try:
        interface.run(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        if interface.server is None:
            raise  # --help or a bad argument: nothing ran
        code = exc.code
    if getattr(interface.server, "listen_failed", False):
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # Exit without the interpreter's teardown. Daphne 4.2.3 on Python 3.11 dies of SIGSEGV in
    # it (seen here: while the garbage collector finalises coroutines cancelled at shutdown,
    # in asyncio.Queue.get), turning a clean stop into a crash for the process manager. After
    # the drain nothing is left that the teardown would finish: connections are closed, and
    # the logs were flushed just above.
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    main()
