"""Shared fixtures. Test modules cannot import each other (importlib mode), so they live here."""

from __future__ import annotations

import os

import pytest

# Before anything imports grpc (it reads this once). Servers are started with a preexec_fn, so
# Python forks instead of vforking, and with fork support on, gRPC's fork handlers restart its
# poller in the child, which then aborts on the epoll descriptor close_fds closed
# (grpc/grpc#43055): about 2% of server starts died before exec while other tests' channels were
# live. The tests never use gRPC in a forked child, so they need no fork support.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from engine.tokenizer import (
    Tokenizer,
    build_sentencepiece_tokenizer_dir,
    build_tekken_tokenizer_dir,
)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """HF directory of Mistral's 32768-token SentencePiece tokenizer (from mistral_common)."""
    return build_sentencepiece_tokenizer_dir(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def tekken_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """HF directory of Mistral's 131072-token Tekken tokenizer (from mistral_common)."""
    return build_tekken_tokenizer_dir(tmp_path_factory.mktemp("tekken"))


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(sentencepiece_tokenizer_dir: str) -> Tokenizer:
    return Tokenizer.from_dir(sentencepiece_tokenizer_dir)


@pytest.fixture(scope="session")
def tekken_tokenizer(tekken_tokenizer_dir: str) -> Tokenizer:
    return Tokenizer.from_dir(tekken_tokenizer_dir)
