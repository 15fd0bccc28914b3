"""config.json parsing: the hub's Mistral-7B-Instruct files, transformers 5's spelling, and clear errors."""

import json

import pytest
import torch
from transformers import MistralConfig as HFMistralConfig

from mistral_grpc.model.config import ConfigError, MistralConfig

# The fields of mistralai/Mistral-7B-Instruct-v0.1's config.json (v0.2 and v0.3 below change a few).
HUB_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
HUB_V02 = {**HUB_V01, "rope_theta": 1000000.0, "sliding_window": None, "transformers_version": "4.36.0"}
HUB_V03 = {**HUB_V02, "vocab_size": 32768, "transformers_version": "4.42.0.dev0"}


@pytest.mark.parametrize("hub, theta, window, vocab", [(HUB_V01, 1e4, 4096, 32000), (HUB_V02, 1e6, None, 32000),
                                                       (HUB_V03, 1e6, None, 32768)])
def test_hub_configs(hub, theta, window, vocab):
    config = MistralConfig.from_dict(hub)
    assert (config.rope_theta, config.sliding_window, config.vocab_size) == (theta, window, vocab)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (4096, 32, 14336)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert (config.q_size, config.kv_size) == (4096, 1024)
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 32768
    assert config.torch_dtype == torch.bfloat16 and not config.tie_word_embeddings


def test_what_transformers_5_writes(tmp_path):
    HFMistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=32, vocab_size=300, rope_theta=5e5, sliding_window=None,
                    max_position_embeddings=1024, rms_norm_eps=1e-6, dtype="float16").save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written  # the spelling this test is about
    config = MistralConfig.from_dir(tmp_path)
    assert config == MistralConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                   head_dim=32, intermediate_size=96, vocab_size=300, rms_norm_eps=1e-6,
                                   rope_theta=5e5, sliding_window=None, max_position_embeddings=1024,
                                   torch_dtype=torch.float16)


def test_to_dict_round_trips_and_transformers_reads_it():
    config = MistralConfig.from_dict(HUB_V01)
    assert MistralConfig.from_dict(config.to_dict()) == config
    hf = HFMistralConfig(**config.to_dict())
    assert hf.rope_parameters["rope_theta"] == 1e4 and hf.sliding_window == 4096 and hf.head_dim == 128


def without(field):
    return {k: v for k, v in HUB_V02.items() if k != field}


@pytest.mark.parametrize("data, field", [
    (without("hidden_size"), "hidden_size"),
    (without("num_key_value_heads"), "num_key_value_heads"),
    (without("rope_theta"), "rope_theta"),
    (without("sliding_window"), "sliding_window"),  # transformers would silently default it to 4096
    (without("torch_dtype"), "torch_dtype"),
    (without("rms_norm_eps"), "rms_norm_eps"),
    (without("max_position_embeddings"), "max_position_embeddings"),
    ({**HUB_V02, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "rope_theta"),
    ({**HUB_V02, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_parameters.rope_type"),
    ({**HUB_V02, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({**HUB_V02, "dtype": "float32"}, "torch_dtype"),
    ({**HUB_V02, "torch_dtype": "int8"}, "torch_dtype"),
    ({**HUB_V02, "num_key_value_heads": 5}, "num_key_value_heads"),
    ({**HUB_V02, "num_attention_heads": 24}, "head_dim"),  # 4096 / 24 is no integer
    ({**HUB_V02, "head_dim": 33}, "head_dim"),
    ({**HUB_V02, "sliding_window": 0}, "sliding_window"),
    ({**HUB_V02, "vocab_size": -1}, "vocab_size"),
    ({**HUB_V02, "num_hidden_layers": True}, "num_hidden_layers"),
    ({**HUB_V02, "intermediate_size": "14336"}, "intermediate_size"),
    ({**HUB_V02, "rms_norm_eps": 0}, "rms_norm_eps"),
    ({**HUB_V02, "tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({**HUB_V02, "model_type": "llama"}, "model_type"),
    ({**HUB_V02, "hidden_act": "gelu"}, "hidden_act"),
])
def test_missing_or_contradictory_fields_are_named(data, field):
    with pytest.raises(ConfigError) as error:
        MistralConfig.from_dict(data)
    assert error.value.field == field
    assert str(error.value).startswith(f"config.json: {field}: ")


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        MistralConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MistralConfig.from_dir(tmp_path)
