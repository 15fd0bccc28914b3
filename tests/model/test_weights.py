"""Loading safetensors checkpoints: layouts, dtypes, memory, and every way a checkpoint can be wrong."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from mistral_checkpoints import SMALL, V02, PagedRunner, hf_logits, save_random_model
from safetensors.torch import load_file, save_file

from mistral_grpc.model.config import MistralConfig
from mistral_grpc.model.decoder import MistralDecoder
from mistral_grpc.model.weights import WeightsError, load_weights

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, vocab_size=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers' state dict) of a tiny float32 model saved as one file."""
    path = tmp_path_factory.mktemp("single")
    model = save_random_model(path, **TINY)
    return path, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def load(path, dtype=torch.float32):
    return load_weights(path, MistralConfig.from_dir(path), dtype)


def assert_weights_equal(weights, state, dtype=torch.float32):
    def expected(*names):
        return torch.cat([state[name] for name in names]).to(dtype)

    assert torch.equal(weights.embed_tokens, expected("model.embed_tokens.weight"))
    assert torch.equal(weights.lm_head, expected("lm_head.weight"))
    assert torch.equal(weights.norm, expected("model.norm.weight"))
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        assert torch.equal(layer.input_norm, expected(p + "input_layernorm.weight"))
        assert torch.equal(layer.qkv, expected(*(p + f"self_attn.{x}_proj.weight" for x in "qkv")))
        assert torch.equal(layer.o_proj, expected(p + "self_attn.o_proj.weight"))
        assert torch.equal(layer.post_attention_norm, expected(p + "post_attention_layernorm.weight"))
        assert torch.equal(layer.gate_up, expected(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"))
        assert torch.equal(layer.down_proj, expected(p + "mlp.down_proj.weight"))
        assert layer.qkv.is_contiguous() and layer.gate_up.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_file_into_each_dtype(checkpoint, dtype):
    path, state = checkpoint
    assert_weights_equal(load(path, dtype), state, dtype)


def test_projections_can_be_read_on_another_device(checkpoint):
    """What a quantized CUDA load does (projection_device="cpu"): each layer's projections are read on the
    CPU, to be quantized there, and reach prepare_layer with their values; the rest goes to `device`
    (here "meta", which takes the copies without memory, standing in for a GPU)."""
    path, state = checkpoint
    seen = []
    weights = load_weights(path, MistralConfig.from_dir(path), torch.float32, "meta",
                           prepare_layer=lambda layer: seen.append(layer) or layer, projection_device="cpu")
    assert len(seen) == TINY["num_hidden_layers"]
    assert weights.embed_tokens.is_meta and weights.lm_head.is_meta and weights.norm.is_meta
    for i, layer in enumerate(seen):
        p = f"model.layers.{i}."
        assert layer.input_norm.is_meta and layer.post_attention_norm.is_meta
        assert torch.equal(layer.qkv, torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        assert torch.equal(layer.o_proj, state[p + "self_attn.o_proj.weight"])
        gate_up = torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
        assert torch.equal(layer.gate_up, gate_up)
        assert torch.equal(layer.down_proj, state[p + "mlp.down_proj.weight"])


def test_sharded_checkpoint_with_index(tmp_path):
    model = save_random_model(tmp_path, **TINY)
    state = model.state_dict()
    os.remove(tmp_path / "model.safetensors")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert_weights_equal(load(tmp_path), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_checkpoint(tmp_path, dtype):
    model = save_random_model(tmp_path, **TINY).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert MistralConfig.from_dir(tmp_path).torch_dtype == torch.bfloat16
    assert_weights_equal(load(tmp_path, dtype), model.state_dict(), dtype)


def test_tied_embeddings_share_the_embedding(tmp_path):
    model = save_random_model(tmp_path, **TINY, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    weights = load(tmp_path)
    assert weights.lm_head is weights.embed_tokens
    tokens = list(range(3, 20))
    logits = PagedRunner(MistralDecoder.from_dir(tmp_path), block_size=16).step({"a": tokens})["a"]
    torch.testing.assert_close(logits, hf_logits(model, tokens)[-1], atol=2e-4, rtol=0)


def rewrite(path, edit):
    """Applies edit(tensors) to a checkpoint's single file."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    source, _ = checkpoint
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    return tmp_path


def test_missing_tensor(copy_of):
    rewrite(copy_of, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load(copy_of)


def test_wrong_shape(copy_of):
    def transpose(tensors):
        name = "model.layers.0.self_attn.o_proj.weight"
        tensors[name] = torch.zeros(64, 32)

    rewrite(copy_of, transpose)
    with pytest.raises(WeightsError, match=r"o_proj\.weight.*shape \[64, 32\].*\[64, 64\]"):
        load(copy_of)


def test_more_layers_than_the_config(copy_of):
    config = json.loads((copy_of / "config.json").read_text())
    (copy_of / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(WeightsError, match=r"does not describe.*model\.layers\.1\."):
        load(copy_of)


def test_integer_tensor(copy_of):
    rewrite(copy_of, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    with pytest.raises(WeightsError, match=r"model\.norm\.weight is I8"):
        load(copy_of)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_file(copy_of, keep):
    data = (copy_of / "model.safetensors").read_bytes()
    (copy_of / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(WeightsError, match="truncated"):
        load(copy_of)


def test_no_weights(tmp_path, checkpoint):
    (tmp_path / "config.json").write_bytes((checkpoint[0] / "config.json").read_bytes())
    with pytest.raises(WeightsError, match="neither model.safetensors nor model.safetensors.index.json"):
        load(tmp_path)


def test_index_names_a_missing_shard(tmp_path):
    model = save_random_model(tmp_path, **TINY)
    os.remove(tmp_path / "model.safetensors")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"names shard '{shard.name}'"):
        load(tmp_path)


_RSS_PROBE = textwrap.dedent("""
    import sys, torch
    from mistral_grpc.model.config import MistralConfig
    from mistral_grpc.model.weights import load_weights

    def status_kib(key):  # this process's own figures: ru_maxrss would start at the forking parent's peak
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    config = MistralConfig.from_dir(path)
    torch.ones(1 << 16).to(dtype)  # the first copy kernel's own memory is not the loader's
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    before = status_kib("VmRSS:")
    weights = load_weights(path, config, dtype)
    peak = status_kib("VmHWM:")
    total = sum(t.numel() * t.element_size() for t in [weights.embed_tokens, weights.lm_head, weights.norm]
                + [t for layer in weights.layers for t in vars(layer).values()])
    print((peak - before) * 1024 / total)
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_stays_near_the_weights(tmp_path, dtype):
    """A ~200 MB float32 checkpoint: peak RSS growth while loading stays under 1.3x the loaded weights."""
    config = MistralConfig.from_dict({**SMALL, **V02, "hidden_size": 1024, "num_attention_heads": 8,
                                      "intermediate_size": 2816, "num_hidden_layers": 4, "vocab_size": 2000,
                                      "torch_dtype": "float32"})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    h, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
              "model.norm.weight": (h,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    save_file({name: torch.ones(shape) for name, shape in shapes.items()}, tmp_path / "model.safetensors")

    result = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path), dtype], capture_output=True,
                            text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert float(result.stdout) < 1.3
