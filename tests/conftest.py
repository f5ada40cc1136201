"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for in-process model tests: their shapes are tiny, and on a busy 2-core machine two
    OpenMP threads spin against other processes (measured 3.4 s with one thread vs 21.7 s with two for the
    overfit test under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
