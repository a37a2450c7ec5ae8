"""Test-session settings shared by every test file."""

import os

import torch

# pytest-xdist runs one worker per core: one intra-op thread each avoids oversubscribing the
# CPU (two workers x two threads on two cores made small training steps 100x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
