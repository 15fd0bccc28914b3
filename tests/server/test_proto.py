"""The contract: generated stubs match proto/ byte for byte, and every JSON name is the field name."""

import importlib.util
from pathlib import Path

import pytest

from mistral_grpc.proto.mistral.chat.v1 import chat_pb2

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "python" / "mistral_grpc" / "proto"


def load_setup_py():
    spec = importlib.util.spec_from_file_location("mistral_grpc_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_are_fresh(tmp_path):
    load_setup_py().generate_grpc_stubs(str(tmp_path))
    fresh = {p.relative_to(tmp_path / "mistral_grpc" / "proto"): p.read_bytes()
             for p in (tmp_path / "mistral_grpc" / "proto").rglob("*") if p.is_file()}
    assert fresh, "protoc generated nothing"
    stale = [str(path) for path, data in fresh.items()
             if not (STUBS / path).is_file() or (STUBS / path).read_bytes() != data]
    assert not stale, f"stale gRPC stubs {stale}: regenerate with `python setup.py build_ext --inplace`"


def all_messages(descriptors):
    for descriptor in descriptors:
        yield descriptor
        yield from all_messages(descriptor.nested_types)


@pytest.mark.parametrize("message", list(all_messages(chat_pb2.DESCRIPTOR.message_types_by_name.values())),
                         ids=lambda m: m.name)
def test_json_names_are_the_snake_case_field_names(message):
    assert [f.json_name for f in message.fields] == [f.name for f in message.fields]


def test_every_request_tunable_is_optional():
    request = chat_pb2.ChatRequest.DESCRIPTOR
    tunables = ("temperature", "top_p", "top_k", "max_tokens", "n", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "seed", "logprobs", "top_logprobs", "tool_choice", "stream")
    assert all(request.fields_by_name[name].has_presence for name in tunables)
