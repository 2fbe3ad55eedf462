"""Shared fixtures: tiny random-initialised models and a locally trained tokenizer (no downloads). The helpers
themselves live in ``rmu_analysis.testing`` (the benchmarks and GPU scripts use them too)."""
from __future__ import annotations

import pytest
import torch

from rmu_analysis import testing


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run several times faster on one thread (CI has 2 cores); tests that want more set it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return testing.tiny_tokenizer()


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    return testing.tiny_llama(len(tiny_tokenizer), tokenizer=tiny_tokenizer)
