"""Test-session settings shared by every test file."""

import os

import pytest
import torch

# pytest-xdist runs one worker per core: one intra-op thread each avoids oversubscribing the
# CPU (two workers x two threads on two cores made small training steps 100x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and immune to a busy machine's thread contention) on 1 thread;
    use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
