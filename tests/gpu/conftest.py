import pytest


@pytest.fixture
def device():
    return "cuda"


@pytest.fixture
def big():
    """Model-sized shapes (Nemotron-3-Nano: 64 Mamba heads of 64 x 128, 128 experts, GQA 32:2 x 128)."""
    return True


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
