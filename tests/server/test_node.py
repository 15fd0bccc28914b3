"""A Node.js @grpc/grpc-js client (loading the .proto at run time) streaming completions."""

import json

import pytest

import seed_bodies
from external_clients import NODE, NPM, node_stream as stream
from fake_engine import choice_text

pytestmark = pytest.mark.skipif(NODE is None or NPM is None,
                                reason="Node.js and npm are not installed: the Node.js client test needs both")


def test_node_client_streams_a_completion(serve_fake, node_client):
    server = serve_fake(model_name=seed_bodies.SERVED_MODEL, step_delay=0.001)
    code, chunks = stream(node_client, server.target, seed_bodies.STREAM)
    assert code == 0
    assert {(c["id"], c["object"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], "chat.completion.chunk", seed_bodies.SERVED_MODEL)}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice_text(0)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


def test_node_client_streams_n_choices_and_sees_errors(serve_fake, node_client):
    server = serve_fake(step_delay=0.001)
    code, chunks = stream(node_client, server.target, json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                                  "n": 2, "temperature": 0.7, "seed": 1}))
    assert code == 0
    for index in (0, 1):
        mine = [choice for chunk in chunks for choice in chunk["choices"] if choice["index"] == index]
        assert "".join(choice["delta"].get("content", "") for choice in mine) == choice_text(index)
    code, lines = stream(node_client, server.target, json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                                 "top_p": 0}))
    assert code == 1 and lines[-1]["error"]["code"] == "INVALID_ARGUMENT" and "top_p" in lines[-1]["error"]["details"]
