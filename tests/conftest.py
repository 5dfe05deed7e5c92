import builders
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_lm():
    """Builds the tiny causal LM of :data:`builders.TINY_LM`: ``tiny_lm(depth=2, ...)`` overrides options."""
    return builders.tiny_lm


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
