"""`mistral-grpc serve --model DIR` on a pre-quantized (compressed-tensors W4A16) demo model: detected
without a flag, the load line names the method, bits, group size and the weights' size, and a greedy Chat
answers with the tokens and logprobs of the in-process engine on the same directory."""

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import MistralForCausalLM

from harness import ServerProcess, demo_server
from mistral_grpc.client import ChatClient
from mistral_grpc.model.decoder import MistralDecoder
from mistral_grpc.model.demo import write_demo_model

sys.path.insert(0, str(Path(__file__).parent.parent / "model"))
from prequantized_checkpoints import save_compressed_tensors_model  # noqa: E402

KV_CACHE = 512 * 2**10


@pytest.fixture(scope="module")
def w4a16_demo(tmp_path_factory) -> Path:
    float_dir = Path(write_demo_model(tmp_path_factory.mktemp("demo_float")))
    path = tmp_path_factory.mktemp("demo_w4a16")
    model = MistralForCausalLM.from_pretrained(float_dir).to(torch.bfloat16)
    save_compressed_tensors_model(model, path, bits=4, strategy="group", group_size=128, symmetric=False)
    shutil.copyfile(float_dir / "tokenizer.json", path / "tokenizer.json")
    return path


def test_serve_a_compressed_tensors_checkpoint_logs_its_scheme_and_answers_as_the_engine(loop, w4a16_demo):
    server = ServerProcess(["-m", "mistral_grpc.cli", "serve", "--host", "localhost", "--port", "0", "--device", "cpu",
                            "--model", str(w4a16_demo), "--kv-cache-memory", str(KV_CACHE)])
    try:
        with ChatClient(server.target) as client:
            served = client.chat("Hello!", temperature=0, max_tokens=8, logprobs=True)
        assert served.usage.completion_tokens == 8
        pattern = r"quantization compressed-tensors int4 group 128 asymmetric, weights (\d+\.\d\d) GiB"
        loaded = [m for line in server.lines if (m := re.search(pattern, line))]
        assert loaded, server.lines
    finally:
        server.close()
    with demo_server(loop, model=str(w4a16_demo), kv_cache_memory=KV_CACHE) as local, \
            ChatClient(local.target) as client:
        expected = client.chat("Hello!", temperature=0, max_tokens=8, logprobs=True)
    # The weights' size: the projections packed at ~4.5 bits a weight, the embedding and LM head in bf16.
    assert float(loaded[0].group(1)) == round(MistralDecoder.from_dir(w4a16_demo).weight_bytes / 2**30, 2)
    assert served.choices[0].message.content == expected.choices[0].message.content
    assert [e.logprob for e in served.choices[0].logprobs.content] == \
        [e.logprob for e in expected.choices[0].logprobs.content]
