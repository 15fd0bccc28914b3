"""The shipped tokenizer.json files against mistral-common's SentencePiece models.

If these fail after a tokenizers or mistral-common upgrade, rerun scripts/make_tokenizer_json.py.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
from tokenizer_cases import CONTROL_SPELLINGS, FRAGMENTS, REFERENCE_MODELS, SHIPPED, random_text
from tokenizers import Tokenizer

from mistral_grpc.tokenizer import MistralTokenizer

V3_CONTROL_IDS = {"[INST]": 3, "[/INST]": 4, "[TOOL_CALLS]": 5, "[AVAILABLE_TOOLS]": 6, "[/AVAILABLE_TOOLS]": 7,
                  "[TOOL_RESULTS]": 8, "[/TOOL_RESULTS]": 9}


def sentencepiece(reference, version):
    return reference[version].instruct_tokenizer.tokenizer


def corpus(count: int, seed: int, pieces: list[str]) -> list[str]:
    rng = random.Random(seed)
    texts = [random_text(rng) for _ in range(count)]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(count)]
    return texts + FRAGMENTS + [" " * n + "x" + " " * n for n in range(40)]


def test_vocabulary_is_sentencepieces(ours, reference, version) -> None:
    sp = sentencepiece(reference, version)
    hf = Tokenizer.from_file(str(SHIPPED[version]))
    assert hf.get_vocab_size() == sp.n_words == ours[version].vocab_size
    assert [hf.id_to_token(i) for i in range(sp.n_words)] == sp.vocab()
    specials = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    assert specials == sp.special_ids | {sp.unk_id}
    assert (ours[version].bos_id, ours[version].eos_id) == (sp.bos_id, sp.eos_id) == (1, 2)


def test_v3_control_tokens(ours, reference) -> None:
    sp = sentencepiece(reference, "v3")
    for spelling, token_id in V3_CONTROL_IDS.items():
        assert sp.get_special_token(spelling) == token_id
        assert sp.is_special(token_id)
    assert ours["v3"].tool_calls_token_id == 5
    assert ours["v1"].tool_calls_token_id is None


def test_shipped_files_encode_like_sentencepiece_on_their_own(reference, version) -> None:
    """Plain HF use of the files (as other code may load them): only encode_special_tokens to set."""
    sp = sentencepiece(reference, version)
    hf = Tokenizer.from_file(str(SHIPPED[version]))
    hf.encode_special_tokens = True
    # [REFERENCE_DOC_n] spellings are the one documented gap of the files used alone.
    texts = [t for t in corpus(2000, 10, sp.vocab()) if "[REFERENCE_DOC_" not in t]
    encoded = hf.encode_batch(texts, add_special_tokens=False)
    assert [e.ids for e in encoded] == [sp.encode(t, False, False) for t in texts]


def test_encode_matches_mistral_common(ours, reference, version) -> None:
    sp = sentencepiece(reference, version)
    texts = corpus(3000, 11, sp.vocab())
    texts += [f"see [REFERENCE_DOC_{n}]and [REFERENCE_DOC_{n}] there" for n in range(20)]
    for text in texts:
        assert ours[version].encode(text) == sp.encode(text, False, False), repr(text)


def test_control_spellings_encode_as_text(ours, reference, version) -> None:
    sp = sentencepiece(reference, version)
    for spelling in CONTROL_SPELLINGS:
        ids = ours[version].encode(spelling)
        assert ids == sp.encode(spelling, False, False)
        assert not set(ids) & sp.special_ids, spelling


def test_from_dir_picks_the_template(tmp_path, version) -> None:
    shutil.copy(SHIPPED[version], tmp_path / "tokenizer.json")
    assert MistralTokenizer.from_dir(tmp_path).template_version == version
    assert MistralTokenizer.from_dir(tmp_path, template="v1").template_version == "v1"


def test_template_choice_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="v3"):
        MistralTokenizer.from_file(SHIPPED["v1"], template="v3")
    with pytest.raises(ValueError, match="template"):
        MistralTokenizer.from_file(SHIPPED["v1"], template="v2")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        MistralTokenizer.from_dir(tmp_path)


def test_server_side_import_needs_no_sentencepiece_or_transformers() -> None:
    code = (
        "import sys, mistral_grpc.tokenizer as t; "
        f"t.MistralTokenizer.from_file({str(SHIPPED['v3'])!r}).encode_chat([t.ChatMessage('user', 'hi')]); "
        "print(sorted(m for m in ('sentencepiece', 'transformers', 'mistral_common') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"


def test_a_transformers_conversion_is_read_through_the_shipped_file(tmp_path, ours, reference) -> None:
    """transformers 5 ranks whitespace merges by piece id, so its file alone encodes runs of spaces
    unlike SentencePiece; a model directory holding such a file still gets mistral-common's ids."""
    transformers = pytest.importorskip("transformers")
    shutil.copy(REFERENCE_MODELS["v3"], tmp_path / "tokenizer.model")
    transformers.LlamaTokenizer.from_pretrained(str(tmp_path)).save_pretrained(str(tmp_path))
    text = "x" + " " * 20 + "y  leading"
    expected = sentencepiece(reference, "v3").encode(text, False, False)
    converted = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert converted.encode(text, add_special_tokens=False).ids != expected
    assert MistralTokenizer.from_dir(tmp_path).encode(text) == expected
