"""Our tokenizers (the shipped JSON files) and mistral-common's, the reference, per template version."""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as ReferenceTokenizer
from tokenizer_cases import REFERENCE_MODELS, SHIPPED

from mistral_grpc.tokenizer import MistralTokenizer


@pytest.fixture(scope="session")
def ours() -> dict[str, MistralTokenizer]:
    return {v: MistralTokenizer.from_file(path) for v, path in SHIPPED.items()}


@pytest.fixture(scope="session")
def reference() -> dict[str, ReferenceTokenizer]:
    """MistralTokenizer.v1() / .v3(), validating as a server does (serving mode).

    The encoding is the same as test mode's; serving mode also refuses tool calls left unanswered
    at the end of a conversation, which a server must.
    """
    return {
        v: ReferenceTokenizer.from_file(str(path), mode=ValidationMode.serving) for v, path in REFERENCE_MODELS.items()
    }


@pytest.fixture(params=["v1", "v3"])
def version(request: pytest.FixtureRequest) -> str:
    return request.param
