"""A blocking Python client for mistral.chat.v1.ChatService.

    from mistral_grpc.client import ChatClient

    with ChatClient("localhost:50051") as client:
        response = client.chat("Hello!", temperature=0.7, max_tokens=64)
        print(response.choices[0].message.content, response.usage.total_tokens)
        for text in client.stream_text([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hello!"}]):
            print(text, end="", flush=True)

Messages and fields take the OpenAI JSON shapes (a plain string is one user message). Errors are
grpc.RpcError; field_violations(error) lists the bad fields of an INVALID_ARGUMENT.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from mistral_grpc.proto.mistral.chat.v1 import chat_pb2, chat_pb2_grpc

Messages = str | Sequence[dict[str, Any]]

_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 << 20),  # as much as the server may send
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.keepalive_time_ms", 30_000),  # notice a dead server during a long, quiet stream
    ("grpc.keepalive_timeout_ms", 10_000),
)


def build_request(messages: Messages, **fields: Any) -> chat_pb2.ChatRequest:
    """A ChatRequest from OpenAI-shaped data; unknown fields raise (json_format.ParseError)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"messages": list(messages), **{name: value for name, value in fields.items() if value is not None}}
    return json_format.ParseDict(body, chat_pb2.ChatRequest())


def check_api_key(key: str | bytes, what: str = "the API key") -> None:
    """Raises ValueError unless `Bearer <key>` can be a gRPC metadata value: printable ASCII only (no
    other character, no control character such as a second line)."""
    data = key.encode("utf-8", errors="surrogateescape") if isinstance(key, str) else key
    if not data:
        raise ValueError(f"{what} is empty")
    for position, byte in enumerate(data):
        if not 0x20 <= byte <= 0x7E:
            raise ValueError(f"{what} holds byte 0x{byte:02x} at position {position}, which gRPC metadata cannot "
                             "carry: a key is printable ASCII (letters, digits, punctuation) on one line")


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of each bad field an INVALID_ARGUMENT names; empty for other errors."""
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    violations = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return violations


class ChatClient:
    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None,
                 compression: grpc.Compression | None = None) -> None:
        """tls: connect with TLS (root_certificates: PEM of the CA to trust; None = the system's).
        timeout: the default deadline of each call in seconds (None = no deadline).
        Raises ValueError for an api_key that gRPC metadata cannot carry."""
        if api_key:
            check_api_key(api_key)
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS,
                                                compression=compression)
        else:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS, compression=compression)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout

    def chat(self, messages: Messages, *, timeout: float | None = None, **fields: Any) -> chat_pb2.ChatResponse:
        """The whole completion. fields: temperature, top_p, max_tokens, n, stop, seed, tools, ..."""
        return self._stub.Chat(build_request(messages, **fields), timeout=timeout or self._timeout,
                               metadata=self._metadata)

    def stream_chat(self, messages: Messages, *, timeout: float | None = None,
                    **fields: Any) -> Iterator[chat_pb2.ChatChunk]:
        """Chunks as the tokens are made. Stopping the iteration early cancels the generation."""
        call = self._stub.StreamChat(build_request(messages, **fields), timeout=timeout or self._timeout,
                                     metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended

    def stream_text(self, messages: Messages, **fields: Any) -> Iterator[str]:
        """Just the text of choice 0, piece by piece."""
        for chunk in self.stream_chat(messages, **fields):
            for choice in chunk.choices:
                if choice.index == 0 and choice.delta.content:
                    yield choice.delta.content

    def health(self, service: str = "") -> str:
        """The health service's answer: "SERVING", "NOT_SERVING", ..."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
