"""Test-wide setup.

Many tests draw their inputs from torch's global generator. Each module's collection (where parametrize lists
are built) and each test start from a seed derived from their node id, so a test sees the same data whether it
runs alone, under ``-k`` or in the full suite, and a failure reproduces with ``pytest NODEID``.
"""
import zlib

import pytest
import torch


def _seed_from(nodeid: str) -> None:
    torch.manual_seed(zlib.crc32(nodeid.encode()))


def pytest_collectstart(collector):
    if isinstance(collector, pytest.Module):
        _seed_from(collector.nodeid)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded_global_rng(request):
    _seed_from(request.node.nodeid)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts its own graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
