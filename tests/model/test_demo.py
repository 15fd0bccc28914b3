"""The demo model: deterministic, a valid Hugging Face checkpoint, and free of transformers at runtime."""

import subprocess
import sys

import pytest
import torch
from mistral_checkpoints import PagedRunner, hf_logits
from transformers import MistralForCausalLM

from mistral_grpc.model import demo
from mistral_grpc.model.config import MistralConfig
from mistral_grpc.model.decoder import MistralDecoder
from mistral_grpc.tokenizer.messages import ChatMessage
from mistral_grpc.tokenizer.mistral_tokenizer import MistralTokenizer


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.write_demo_model(tmp_path_factory.mktemp("demo"), with_tokenizer=False)


def test_builds_the_same_bytes_every_time(demo_dir, tmp_path):
    again = demo.write_demo_model(tmp_path, with_tokenizer=False)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).read_bytes() == open(f"{demo_dir}/{name}", "rb").read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert again == str(tmp_path)


def test_has_v02_geometry_scaled_down(demo_dir):
    config = MistralConfig.from_dir(demo_dir)
    assert config == demo.demo_config()
    assert (config.vocab_size, config.rope_theta, config.sliding_window) == (32000, 1e6, None)
    assert config.num_attention_heads // config.num_key_value_heads == 4  # v0.2's 32:8
    assert config.max_position_embeddings == 32768


def test_transformers_agrees_and_logits_are_not_flat(demo_dir):
    hf = MistralForCausalLM.from_pretrained(demo_dir).eval()
    decoder = MistralDecoder.from_dir(demo_dir)
    tokens = [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]
    logits = PagedRunner(decoder, block_size=16).step({"a": tokens})["a"]
    torch.testing.assert_close(logits, hf_logits(hf, tokens)[-1], atol=2e-4, rtol=0)
    assert logits.std() > 1 and logits.softmax(-1).max() > 0.01  # sampling settings make a difference


def test_ships_the_v1_tokenizer_that_fits_its_vocabulary(tmp_path):
    demo.write_demo_model(tmp_path)
    tokenizer = MistralTokenizer.from_dir(tmp_path)
    assert tokenizer.vocab_size == demo.demo_config().vocab_size and tokenizer.template_version == "v1"
    tokens = tokenizer.encode_chat([ChatMessage(role="user", content="Hello!")])
    logits = PagedRunner(MistralDecoder.from_dir(tmp_path), block_size=16).step({"a": tokens})["a"]
    assert logits.shape == (32000,) and logits.isfinite().all()


def test_tokenizer_is_copied_in(tmp_path, monkeypatch):
    source = tmp_path / "source.json"
    source.write_text('{"model": {}}')
    monkeypatch.setattr(demo, "TOKENIZER_SOURCE", str(source))
    out = demo.write_demo_model(tmp_path / "demo")
    assert (tmp_path / "demo" / "tokenizer.json").read_text() == '{"model": {}}'
    assert out == str(tmp_path / "demo")


def test_missing_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "TOKENIZER_SOURCE", str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="demo's tokenizer is missing"):
        demo.write_demo_model(tmp_path / "demo")


def test_serving_code_never_imports_transformers(tmp_path):
    script = ("import sys\n"
              "from mistral_grpc.model.demo import write_demo_model\n"
              "from mistral_grpc.model.decoder import MistralDecoder\n"
              f"MistralDecoder.from_dir(write_demo_model({str(tmp_path)!r}, with_tokenizer=False))\n"
              "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    subprocess.run([sys.executable, "-c", script], check=True)
