import pytest
import torch

# Run by tests under torchrun, not a test module (it needs RANK etc. in the environment).
collect_ignore = ["_ddp_train_worker.py"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tol(dtype: torch.dtype) -> float:
    """Relative tolerance for exactness tests, scaled by the dtype's precision."""
    return {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
