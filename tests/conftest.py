import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tol(dtype: torch.dtype) -> float:
    """Relative tolerance for exactness tests, scaled by the dtype's precision."""
    return {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
