"""The grpc.aio server around the engine: ChatService, health, reflection, auth, TLS, metrics, draining.

Lifecycle: the port opens first with health NOT_SERVING (probes and callers see "loading", not
"connection refused"), the engine loads and warms up, health turns SERVING. On SIGTERM/SIGINT health
turns NOT_SERVING, new calls get UNAVAILABLE, running calls get up to the grace period to finish,
then the process exits 0; calls still running then end with UNAVAILABLE saying so. A stop signal
while the model loads stops at once, without waiting for the load. A second stop signal during the
drain ends it at once: running calls end with UNAVAILABLE and serve() raises StoppedBySignal (the CLI
exits 128 + the signal's number). The health service "liveness" stays SERVING throughout (see
LivenessHealth).
"""

import asyncio
import logging
import signal
import socket
import ssl
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from mistral_grpc.metrics import REGISTRY
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2
from mistral_grpc.server import errors
from mistral_grpc.server.auth import ApiKeyInterceptor
from mistral_grpc.server.reflection import enable_reflection
from mistral_grpc.server.responses import MAX_RESPONSE_BYTES
from mistral_grpc.server.servicer import ChatServicer, Engine, add_to_server

logger = logging.getLogger(__name__)


class _PeerGoneWrites(logging.Filter):
    """grpc logs a stream's write that failed because the client had gone (cancelled, deadline,
    disconnected) as an ERROR with a traceback: noise that looks like a server fault to log alerts. The
    call is already counted as CANCELLED or DEADLINE_EXCEEDED, so the record shows at DEBUG only."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIX) or logger.isEnabledFor(logging.DEBUG)


logging.getLogger("grpc._cython.cygrpc").addFilter(_PeerGoneWrites())

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS_SERVICE = "liveness"
_MiB = 1 << 20
_STOP_GRACE_S = 1.0
_END_CALLS_S = 5.0  # how long cancelled calls get to send their status before the server stops

CHANNEL_OPTIONS = (
    # grpc sets SO_REUSEPORT by default, which lets a second server bind the same port and silently take
    # a share of its connections: a port in use must fail the second server's startup instead.
    ("grpc.so_reuseport", 0),
    # A 32K-token prompt is well under 1 MiB of text; 16 MiB leaves room for long tool schemas.
    ("grpc.max_receive_message_length", 16 * _MiB),
    # A whole completion with top_logprobs=20 runs to about 1 KiB per token; the servicer refuses a Chat
    # whose response could outgrow this.
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
    # Long streams may stay quiet between chunks (a long prompt's prefill): ping the peer every 30 s so a
    # vanished client is noticed (and its generation cancelled) and idle-timeout proxies keep the stream.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Clients keeping their own streams alive may ping every 10 s without being sent GOAWAY (too_many_pings).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Clients balancing over DNS (a headless Service) resolve again only when a connection closes: a GOAWAY
    # every ~5 minutes lets them find replicas added since. Running streams are not cut (no age grace).
    ("grpc.max_connection_age_ms", 300_000),
)


class StartupError(Exception):
    """The server cannot start (a port in use, ...): `serve` prints the message as one line."""


class StoppedBySignal(Exception):
    """A second stop signal cut the drain short (the engine may still be in a step: leave with os._exit)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by a second {signal.Signals(signum).name} during the drain")
        self.signum = signum


class LivenessHealth(health.aio.HealthServicer):
    """grpc.health.v1 that also answers for LIVENESS_SERVICE: SERVING for as long as the process answers at
    all, loading and draining included. "" and ChatService say whether to send traffic (readiness); a
    liveness probe on them would have a loading or draining replica killed."""

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if request.service == LIVENESS_SERVICE:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if request.service != LIVENESS_SERVICE:
            return await super().Watch(request, context)
        await context.write(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))
        await asyncio.Event().wait()  # never changes: the stream ends when the server stops


class ServableEngine(Engine, Protocol):
    async def start(self) -> None: ...
    async def drain(self) -> None: ...
    async def shutdown(self) -> None: ...


@dataclass(frozen=True)
class ServeOptions:
    host: str = "[::]"
    port: int = 50051  # 0 = any free port (ChatServer.port tells which)
    metrics_port: int | None = None
    api_key: str | None = None
    tls_cert: bytes | None = None  # PEM; TLS when both are given
    tls_key: bytes | None = None
    grace_period: float = 30.0  # seconds running calls get to finish once draining starts


class ChatServer:
    """Build it inside the event loop that will run it."""

    def __init__(self, engine: ServableEngine, options: ServeOptions) -> None:
        self.engine = engine
        self.options = options
        self.servicer = ChatServicer(engine)
        self.health = LivenessHealth()
        interceptors = [ApiKeyInterceptor(options.api_key)] if options.api_key else []
        # gzip-compressed requests are always accepted; responses go uncompressed unless asked (low latency).
        self._server = grpc.aio.server(interceptors=interceptors, options=CHANNEL_OPTIONS)
        add_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        enable_reflection((CHAT_SERVICE, HEALTH_SERVICE), self._server)
        address = f"{options.host}:{options.port}"
        if options.tls_cert is not None and options.tls_key is not None and (
                reason := _tls_error(options.tls_cert, options.tls_key)):
            raise StartupError(f"cannot serve TLS with --tls-cert and --tls-key: {reason}")
        # Probe first: grpc's own failure also prints a C-core error line before ours.
        if options.port and (reason := _bind_error(options.host, options.port)):
            raise StartupError(f"cannot listen on {address} (--host, --port): {reason}")
        try:
            if options.tls_cert is not None and options.tls_key is not None:
                credentials = grpc.ssl_server_credentials([(options.tls_key, options.tls_cert)])
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpc says only "Failed to bind": find out why
            self.port = 0
        if self.port == 0:
            reason = _bind_error(options.host, options.port) or "the address is in use or not available here"
            raise StartupError(f"cannot listen on {address} (--host, --port): {reason}")
        self._metrics_server = None

    async def start(self) -> None:
        """Opens the port (health NOT_SERVING), loads the engine, then turns health SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.options.metrics_port is not None:
            try:
                self._metrics_server, _ = start_http_server(self.options.metrics_port, registry=REGISTRY)
            except OSError as error:
                raise StartupError(f"cannot serve metrics on port {self.options.metrics_port} (--metrics-port): "
                                   f"{error.strerror or error}") from error
            logger.info("metrics on port %d at /metrics", self._metrics_server.server_port)
        await self._server.start()
        scheme = "TLS" if self.options.tls_cert else "plaintext"
        logger.info("listening on %s:%d (%s); loading the model", self.options.host, self.port, scheme)
        await self.engine.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("SERVING model %r on port %d", self.engine.model_name, self.port)

    async def drain_and_stop(self) -> None:
        """Health NOT_SERVING and new calls UNAVAILABLE at once; running calls finish within the grace."""
        await self.health.enter_graceful_shutdown()
        self.servicer.start_draining()
        logger.info("draining: running calls have %.0f s to finish", self.options.grace_period)
        waits = [self.servicer.wait_for_running_calls()]
        if self.engine.ready:  # an engine still loading has nothing to drain
            waits.append(self.engine.drain())
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.options.grace_period)
        except TimeoutError:
            logger.warning("grace period over: ending the calls still running")
            await self._end_running_calls(errors.server_stopping(
                f"the call ran past the {self.options.grace_period:g} s the server gives running calls to finish"))
        await self._stop()
        logger.info("stopped")

    async def stop_now(self) -> None:
        """Ends the running calls (UNAVAILABLE) and stops without waiting for them or for the engine."""
        self.servicer.start_draining()
        await self._end_running_calls(errors.server_stopping("a second stop signal ended the drain early"))
        await self._stop(wait_for_engine=False)

    async def _end_running_calls(self, status: errors.RequestError) -> None:
        """Cancels the running calls and lets their handlers send `status` before grpc's stop, whose own
        "Cancelling all calls" would otherwise win the race on a loaded machine."""
        self.servicer.end_running_calls(status)
        try:
            await asyncio.wait_for(self.servicer.wait_for_running_calls(), _END_CALLS_S)
        except TimeoutError:
            logger.warning("running calls still ending after %.0f s; stopping anyway", _END_CALLS_S)

    async def _stop(self, wait_for_engine: bool = True) -> None:
        # A moment for the last statuses to go out; then health Watch streams and any call left are cancelled.
        await self._server.stop(grace=_STOP_GRACE_S)
        # An engine that never loaded (a stop while loading) is not waited for: its loader thread is a
        # daemon, and joining it would wait for the whole load.
        if wait_for_engine and self.engine.ready:
            await self.engine.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    async def close(self) -> None:
        """Stops what a failed start() opened; no call ran (the engine never served), so none drains."""
        await self._server.stop(grace=None)
        await self.engine.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", CHAT_SERVICE):
            await self.health.set(service, status)


def _tls_error(cert: bytes, key: bytes) -> str | None:
    """Why this certificate chain and private key cannot serve TLS, or None if OpenSSL loads them.
    (grpc would only fail to open the port, after C-core error lines, as if the address were taken.)"""
    for flag, data, marker, holds in (("--tls-cert", cert, b"-----BEGIN CERTIFICATE-----", "PEM certificate"),
                                      ("--tls-key", key, b"PRIVATE KEY-----", "PEM private key")):
        if marker not in data:
            return f"{flag} is empty" if not data.strip() else f"{flag} holds no {holds}"
    with tempfile.TemporaryDirectory() as private:  # created 0700: the key stays readable by this user only
        cert_path, key_path = Path(private, "cert.pem"), Path(private, "key.pem")
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
        try:
            # A password callback: an encrypted key fails here instead of prompting on the terminal.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=lambda: b"")
        except ssl.SSLError as error:
            if error.reason == "KEY_VALUES_MISMATCH":
                return "the private key in --tls-key is not the key of the certificate in --tls-cert"
            return f"OpenSSL cannot load them ({error.reason or error}; an encrypted key is not supported)"
    return None


def _bind_error(host: str, port: int) -> str | None:
    """Why binding host:port fails ("Address already in use", ...), or None if a plain socket can bind it."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot resolve {host!r}: {error.strerror}"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            try:
                probe.bind(address)
            except OSError as error:
                return error.strerror or str(error)
    return None


async def serve(engine: ServableEngine, options: ServeOptions) -> bool:
    """Runs until SIGTERM or SIGINT, then drains. Raises if the model fails to load, and
    StoppedBySignal if a second signal cuts the drain short. Returns whether the stop came while the
    model was loading: its loader thread then still runs, and the process should leave with os._exit
    (a native thread still running at interpreter exit aborts it)."""
    server = ChatServer(engine, options)
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    starting = asyncio.create_task(server.start())
    first_signal = asyncio.create_task(signals.get())
    await asyncio.wait((starting, first_signal), return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        first_signal.cancel()
        await server.close()
        raise starting.exception()
    await first_signal
    loading = not starting.done()
    if loading:
        logger.info("stop requested while loading")
        starting.cancel()
    draining = asyncio.create_task(server.drain_and_stop())
    second_signal = asyncio.create_task(signals.get())
    await asyncio.wait((draining, second_signal), return_when=asyncio.FIRST_COMPLETED)
    if draining.done():
        second_signal.cancel()
        draining.result()
        return loading
    draining.cancel()
    logger.warning("second stop signal: ending the running calls and stopping now")
    await server.stop_now()
    raise StoppedBySignal(second_signal.result())
