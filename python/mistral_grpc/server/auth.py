"""Optional API key: ChatService calls must carry the metadata `authorization: Bearer <key>`.

Health and reflection stay open: Kubernetes' gRPC probes send no metadata, and the schema is public.
"""

import hmac
from collections.abc import Awaitable, Callable

import grpc

from mistral_grpc import metrics
from mistral_grpc.client import check_api_key
from mistral_grpc.server.errors import UNAUTHENTICATED

PROTECTED_PREFIX = "/mistral.chat.v1.ChatService/"


def read_api_key(path: str) -> str:
    """The key is the file's content without surrounding whitespace (a trailing newline is usual).
    Raises ValueError for a key gRPC metadata cannot carry (see check_api_key)."""
    with open(path, "rb") as file:
        key = file.read().strip()
    if not key:
        raise ValueError(f"the API key file {path} is empty")
    check_api_key(key, f"the API key in {path}")
    return key.decode("ascii")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str) -> None:
        self._expected = api_key.encode()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX) or self._authorized(details):
            return handler
        return _denying(handler, details.method.removeprefix(PROTECTED_PREFIX))

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        sent = [value for key, value in details.invocation_metadata or () if key == "authorization"]
        if len(sent) != 1:
            return False
        value = sent[0].encode() if isinstance(sent[0], str) else sent[0]
        scheme, _, key = value.partition(b" ")
        # RFC 6750 (via RFC 7235): the scheme is case-insensitive, "bearer" and "BEARER" included.
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(key.lstrip(b" "), self._expected)  # constant time: no timing hints about the key


def _denying(handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    status = UNAUTHENTICATED.to_status()

    async def deny(request, context: grpc.aio.ServicerContext) -> None:
        metrics.REQUESTS.labels(rpc=rpc, code=status.code.name).inc()
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def deny_stream(request, context: grpc.aio.ServicerContext):
        await deny(request, context)
        yield  # an async generator, as a unary-stream behaviour must be

    serialization = {"request_deserializer": handler.request_deserializer,
                     "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **serialization)
    return grpc.unary_unary_rpc_method_handler(deny, **serialization)
