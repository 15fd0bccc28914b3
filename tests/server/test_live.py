"""The server through real gRPC channels (Python client) on the fake engine: deadlines, cancellation,
concurrency, health, draining, API key, TLS, gzip, message sizes and the metrics port."""

import datetime
import logging
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from fake_engine import FakeEngine, choice_text
from harness import LiveServer
from mistral_grpc.client import ChatClient, field_violations
from mistral_grpc.metrics import REGISTRY
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2, chat_pb2_grpc
from mistral_grpc.server.app import ServeOptions, StartupError
from mistral_grpc.tokenizer import ChatMessage

MiB = 2**20
LONG = tuple(f" w{i}" for i in range(400))  # a completion that outlives the calls that cancel it


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def count(rpc: str, code: str) -> float:
    return REGISTRY.get_sample_value("mistral_grpc_requests_total", {"rpc": rpc, "code": code}) or 0.0


def test_chat_and_stream_through_the_python_client(serve_fake):
    server = serve_fake(step_delay=0.001)
    with ChatClient(server.target) as client:
        response = client.chat("Hello!", n=2, temperature=0.5)
        assert [c.message.content for c in response.choices] == [choice_text(0), choice_text(1)]
        assert "".join(client.stream_text([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hello!"}])) == choice_text(0)
        with pytest.raises(grpc.RpcError) as raised:
            client.chat("Hello!", temperature=9, top_p=0)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in field_violations(raised.value)] == ["temperature", "top_p"]
        assert client.health() == "SERVING"


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat"])
def test_a_deadline_stops_generation_and_frees_its_kv_blocks(serve_fake, rpc):
    server = serve_fake(step_delay=0.02, pieces=LONG)
    before = count(rpc, "DEADLINE_EXCEEDED")
    with ChatClient(server.target) as client, pytest.raises(grpc.RpcError) as raised:
        if rpc == "Chat":
            client.chat("Hello!", timeout=0.3)
        else:
            list(client.stream_chat("Hello!", timeout=0.3))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: server.engine.kv_blocks_used() == 0 and server.engine.running == 0)
    wait_for(lambda: count(rpc, "DEADLINE_EXCEEDED") == before + 1)


def test_a_deadline_the_client_enforces_first_still_counts_as_deadline_exceeded(serve_fake):
    # grpc-timeout rounds what is left at sending (~1.012 s) up to 1.02 s: the client's deadline fires a few ms
    # before the server's copy, whose time_remaining() is still positive when the cancel arrives (timing
    # dependent; test_servicer's test_a_cancel_at_the_deadline_counts_as_deadline_exceeded is exact).
    server = serve_fake(step_delay=0.02, pieces=LONG)
    before = count("Chat", "DEADLINE_EXCEEDED"), count("Chat", "CANCELLED")
    with ChatClient(server.target) as client, pytest.raises(grpc.RpcError) as raised:
        client.chat("Hello!", timeout=1.0175)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: server.engine.running == 0)
    wait_for(lambda: count("Chat", "DEADLINE_EXCEEDED") == before[0] + 1)
    assert count("Chat", "CANCELLED") == before[1]


def test_a_client_that_stops_reading_cancels_its_generation(serve_fake):
    server = serve_fake(step_delay=0.02, pieces=LONG)
    with ChatClient(server.target) as client:
        for i, _ in enumerate(client.stream_text("Hello!")):
            if i == 3:
                assert server.engine.kv_blocks_used() > 0
                break
    wait_for(lambda: server.engine.kv_blocks_used() == 0 and server.engine.running == 0)


def test_concurrent_calls_with_cancellations_end_holding_no_kv_blocks(serve_fake):
    server = serve_fake(step_delay=0.005, pieces=LONG[:60])
    expected = "".join(LONG[:60])

    def call(i: int) -> str:
        with ChatClient(server.target) as client:
            try:
                if i % 4 == 0:
                    return client.chat("Hello!", n=2).choices[1].message.content
                if i % 4 == 1:
                    return "".join(client.stream_text("Hello!"))
                if i % 4 == 2:
                    return client.chat("Hello!", timeout=0.05).choices[0].message.content
                for j, _ in enumerate(client.stream_text("Hello!", n=3)):
                    if j == 5:
                        return "stopped"
            except grpc.RpcError as error:
                return error.code().name

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(call, range(48)))
    assert results[0::4] == [expected] * 12 and results[1::4] == [expected] * 12
    assert set(results[2::4]) <= {"DEADLINE_EXCEEDED", expected} and results[3::4] == ["stopped"] * 12
    wait_for(lambda: server.engine.kv_blocks_used() == 0 and server.engine.running == 0)


def test_health_is_not_serving_while_loading_and_calls_are_unavailable(serve_fake):
    loaded = threading.Event()
    server = serve_fake(start=False, load_gate=loaded)
    server.start(wait_for_engine=False)
    with ChatClient(server.target) as client:
        wait_for(lambda: _health(client) == "NOT_SERVING")
        assert client.health("mistral.chat.v1.ChatService") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as raised:
            client.chat("Hello!")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in raised.value.details()
        loaded.set()
        server.starting.result(timeout=30)
        assert client.health() == "SERVING" and client.health("mistral.chat.v1.ChatService") == "SERVING"
        assert client.chat("Hello!").choices[0].finish_reason == "stop"


def test_stopping_while_loading_does_not_wait_for_the_model(serve_fake):
    loaded = threading.Event()
    server = serve_fake(ServeOptions(host="localhost", port=0, grace_period=30), start=False, load_gate=loaded)
    server.start(wait_for_engine=False)
    with ChatClient(server.target) as client:
        wait_for(lambda: _health(client) == "NOT_SERVING")
    server.begin_stop().result(timeout=10)  # well within the 30 s grace: nothing was running
    loaded.set()


def _health(client: ChatClient) -> str | None:
    try:
        return client.health()
    except grpc.RpcError:
        return None


def test_draining_refuses_new_calls_and_lets_running_streams_finish(serve_fake):
    server = serve_fake(step_delay=0.01, pieces=LONG[:100])
    with ChatClient(server.target) as client:
        stream = client.stream_chat("Hello!")
        first = next(stream)
        stopped = server.begin_stop()
        wait_for(lambda: client.health() == "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as raised:
            client.chat("Hello!")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks = [first, *stream]
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 100
        stopped.result(timeout=30)


def test_draining_cancels_what_outlives_the_grace_period(serve_fake):
    server = serve_fake(ServeOptions(host="localhost", port=0, grace_period=0.5), step_delay=0.02, pieces=LONG)
    with ChatClient(server.target) as client:
        stream = client.stream_chat("Hello!")
        next(stream)
        stopped = server.begin_stop()
        with pytest.raises(grpc.RpcError) as raised:
            list(stream)
        assert raised.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        stopped.result(timeout=30)
    assert server.engine.kv_blocks_used() == 0


def test_a_health_watch_does_not_hold_up_draining(serve_fake):
    server = serve_fake(ServeOptions(host="localhost", port=0, grace_period=60))
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.begin_stop().result(timeout=20)  # no call was running: no need to wait out the 60 s grace
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_api_key_guards_chat_but_not_health(serve_fake, tmp_path):
    server = serve_fake(ServeOptions(host="localhost", port=0, api_key="s3cret-key"))
    before = count("Chat", "UNAUTHENTICATED")
    for key in (None, "wrong", "s3cret-key "):
        with ChatClient(server.target, api_key=key) as client:
            for call in (lambda: client.chat("Hi"), lambda: list(client.stream_chat("Hi"))):
                with pytest.raises(grpc.RpcError) as raised:
                    call()
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer" in raised.value.details()
            assert client.health() == "SERVING"
    assert count("Chat", "UNAUTHENTICATED") == before + 3
    with ChatClient(server.target, api_key="s3cret-key") as client:
        assert client.chat("Hi").choices[0].message.content == choice_text(0)
        assert "".join(client.stream_text("Hi")) == choice_text(0)


def test_the_bearer_scheme_is_case_insensitive(serve_fake):
    server = serve_fake(ServeOptions(host="localhost", port=0, api_key="s3cret-key"))
    with grpc.insecure_channel(server.target) as channel:
        chat = channel.unary_unary("/mistral.chat.v1.ChatService/Chat",
                                   request_serializer=chat_pb2.ChatRequest.SerializeToString,
                                   response_deserializer=chat_pb2.ChatResponse.FromString)
        hi = chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role="user", content="Hi")])
        for value in ("bearer s3cret-key", "BEARER s3cret-key", "bEaReR  s3cret-key"):  # RFC 6750 / 7235
            assert chat(hi, metadata=(("authorization", value),), timeout=10).choices[0].message.content
        for value in ("Basic s3cret-key", "Bearers3cret-key", "s3cret-key", "Bearer S3CRET-KEY"):
            with pytest.raises(grpc.RpcError) as raised:
                chat(hi, metadata=(("authorization", value),), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, value


def self_signed_localhost() -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for localhost, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls(serve_fake):
    cert, key = self_signed_localhost()
    server = serve_fake(ServeOptions(host="localhost", port=0, tls_cert=cert, tls_key=key))
    with ChatClient(server.target, root_certificates=cert) as client:
        assert client.chat("Hello!").choices[0].message.content == choice_text(0)
    with ChatClient(server.target, timeout=5) as plaintext, pytest.raises(grpc.RpcError) as raised:
        plaintext.chat("Hello!")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    other, _ = self_signed_localhost()
    with ChatClient(server.target, root_certificates=other, timeout=5) as untrusting, \
            pytest.raises(grpc.RpcError) as raised:
        untrusting.chat("Hello!")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def raw_chat(target: str, request: chat_pb2.ChatRequest) -> chat_pb2.ChatResponse:
    """Chat over a channel that sends up to 64 MiB, so the size limit met is the server's."""
    options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    with grpc.insecure_channel(target, options=options) as channel:
        return chat_pb2_grpc.ChatServiceStub(channel).Chat(request, timeout=120)


def test_a_request_under_16_mib_is_accepted_and_one_over_is_resource_exhausted(serve_fake):
    server = serve_fake()
    # The bulk rides in `user` (accepted for parity, never tokenized), so only the transport is tested.
    near = chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role="user", content="Hello!")],
                                user="u" * (15 * MiB))
    assert 15 * MiB < near.ByteSize() < 16 * MiB
    assert raw_chat(server.target, near).choices[0].message.content == choice_text(0)
    over = chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role="user", content="Hello!")],
                                user="u" * (16 * MiB))
    with pytest.raises(grpc.RpcError) as raised:
        raw_chat(server.target, over)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in raised.value.details()  # the server refused it, not us
    with ChatClient(server.target) as client:  # and the server goes on serving
        assert client.chat("Hello!").choices[0].message.content == choice_text(0)


def test_gzip_compressed_requests_are_accepted(serve_fake):
    server = serve_fake(max_model_len=4096)
    with ChatClient(server.target, compression=grpc.Compression.Gzip) as client:
        assert client.chat("Hello! " * 1000).choices[0].message.content == choice_text(0)
        assert "".join(client.stream_text("Hello!")) == choice_text(0)


def test_a_32k_token_prompt_goes_through(serve_fake):
    server = serve_fake(max_model_len=32768)
    prompt = " ".join(["word"] * 32000)  # a token a word
    with ChatClient(server.target) as client:
        response = client.chat(prompt, max_tokens=9, logprobs=True, top_logprobs=20)
    expected = len(server.engine.tokenizer.encode_chat([ChatMessage(role="user", content=prompt)]))
    assert response.usage.prompt_tokens == expected > 32000
    assert response.choices[0].message.content == choice_text(0)


def test_metrics_port_serves_the_design_names(serve_fake):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    server = serve_fake(ServeOptions(host="localhost", port=0, metrics_port=port))
    with ChatClient(server.target) as client:
        client.chat("Hello!")
    text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10).read().decode()
    for name in ("mistral_grpc_requests_total", "mistral_grpc_time_to_first_token_seconds",
                 "mistral_grpc_inter_token_latency_seconds", "mistral_grpc_request_duration_seconds",
                 "mistral_grpc_prompt_tokens_total", "mistral_grpc_generation_tokens_total",
                 "mistral_grpc_running_requests", "mistral_grpc_waiting_requests",
                 "mistral_grpc_kv_cache_blocks_used", "mistral_grpc_kv_cache_blocks_total"):
        assert f"\n{name}" in text, name
    assert 'mistral_grpc_requests_total{code="OK",rpc="Chat"}' in text


def test_garbage_and_hostile_requests_do_not_disturb_a_running_stream(serve_fake):
    server = serve_fake(step_delay=0.01, pieces=LONG[:50], max_model_len=4096)
    with ChatClient(server.target) as client, grpc.insecure_channel(server.target) as channel:
        stream = client.stream_chat("Hello!")
        first = next(stream)
        raw_chat = channel.unary_unary("/mistral.chat.v1.ChatService/Chat")  # bytes in, bytes out
        for payload in (b"\xff" * 64, b"\x12\x03\x0a\x01", bytes(range(256)) * 4):
            with pytest.raises(grpc.RpcError) as raised:
                raw_chat(payload, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        hostile = [{"max_tokens": 2**31 - 1}, {"top_logprobs": 10**9, "logprobs": True}, {"n": -(2**31)},
                   {"temperature": 1e308}]
        for fields in hostile:
            with pytest.raises(grpc.RpcError) as raised:
                client.chat("Hi", **fields)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        huge = client.chat("Hi", stop=["x" * 100_000] * 16, seed=2**63 - 1, n=8, max_tokens=3)
        assert len(huge.choices) == 8
        rest = list(stream)
    assert [first, *rest][-1].choices[0].finish_reason == "stop"
    wait_for(lambda: server.engine.kv_blocks_used() == 0)


def _nested_schema_request(levels: int) -> chat_pb2.ChatRequest:
    """A json_schema `levels` objects deep: ordinary JSON Schema, but each level is 6 protobuf levels
    (Struct, its map entry, Value; again for "properties"), so 16 pass protobuf's decode limit of 100."""
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    request = chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role="user", content="Hi")])
    request.response_format.type = "json_schema"
    request.response_format.json_schema.name = "deep"
    request.response_format.json_schema.schema.update(schema)
    return request


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat"])
def test_undecodable_requests_are_invalid_argument_with_a_reason_and_counted(serve_fake, rpc):
    server = serve_fake()
    before = count(rpc, "INVALID_ARGUMENT")
    cases = [(b"\x12\xff\xff\xff\xff\x0f", "not a valid protobuf encoding"),
             (_nested_schema_request(25).SerializeToString(), "nested too deeply")]
    with grpc.insecure_channel(server.target) as channel:
        call = (channel.unary_unary if rpc == "Chat" else channel.unary_stream)(f"/mistral.chat.v1.ChatService/{rpc}")
        for payload, reason in cases:
            with pytest.raises(grpc.RpcError) as raised:
                list(call(payload, timeout=10)) if rpc == "StreamChat" else call(payload, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = raised.value.details()
            assert details.startswith("the request is not a valid mistral.chat.v1.ChatRequest: ") and reason in details
            assert "<class" not in details and "Error" not in details and "upb" not in details
    assert count(rpc, "INVALID_ARGUMENT") == before + 2
    shallow = _nested_schema_request(5)
    shallow.n = 9
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as raised:
        chat_pb2_grpc.ChatServiceStub(channel).Chat(shallow, timeout=10)  # decodes; validation names the bad field
    assert [field for field, _ in field_violations(raised.value)] == ["n"]


def test_a_port_in_use_fails_the_second_server(serve_fake, loop):
    first = serve_fake()
    with pytest.raises(StartupError, match=rf"cannot listen on localhost:{first.server.port} .*already in use"):
        LiveServer(FakeEngine(model_name="impostor"), loop, ServeOptions(host="localhost", port=first.server.port))
    with ChatClient(first.target) as client:
        assert {client.chat("Hi", max_tokens=1).model for _ in range(8)} == {"demo"}


def test_a_metrics_port_in_use_fails_the_start(serve_fake):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = serve_fake(ServeOptions(host="localhost", port=0, metrics_port=port), start=False)
        server.start(wait_for_engine=False)
        with pytest.raises(StartupError, match=rf"cannot serve metrics on port {port} .*already in use"):
            server.starting.result(timeout=30)


def test_reflection_answers_under_v1_as_under_v1alpha(serve_fake):
    """grpcio-reflection serves only v1alpha; newer clients ask grpc.reflection.v1 (same messages, same
    bytes). Through v1, with an API key set (reflection stays open): list the services, then fetch
    ChatService's file with its dependencies and build it into a fresh pool, as a client would."""
    server = serve_fake(options=ServeOptions(port=0, api_key="k"))
    with grpc.insecure_channel(server.target) as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        listed, chat, v1 = info(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="mistral.chat.v1.ChatService"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        ]), timeout=10)
    assert {s.name for s in listed.list_services_response.service} == {
        "mistral.chat.v1.ChatService", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    pool = descriptor_pool.DescriptorPool()
    for serialized in reversed(chat.file_descriptor_response.file_descriptor_proto):  # dependencies last
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
    assert "temperature" in pool.FindMessageTypeByName("mistral.chat.v1.ChatRequest").fields_by_name
    [v1_file] = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in v1.file_descriptor_response.file_descriptor_proto]
    assert v1_file.package == "grpc.reflection.v1"
    assert {m.input_type for m in v1_file.service[0].method} == {".grpc.reflection.v1.ServerReflectionRequest"}


def test_a_write_to_a_client_that_went_away_is_not_logged_as_an_error(caplog):
    """grpc logs a streaming write whose client had gone (ExecuteBatchError) at ERROR with a traceback;
    the server keeps it to DEBUG, and lets grpc's other records through."""
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    with caplog.at_level(logging.INFO):
        grpc_logger.error("ExecuteBatchError raised in core by servicer method [%s]",
                          "/mistral.chat.v1.ChatService/StreamChat")
        grpc_logger.error("Unexpected error in the server")
    assert [r.getMessage() for r in caplog.records] == ["Unexpected error in the server"]
