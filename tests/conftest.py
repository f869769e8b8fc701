import pytest
import torch

# Scripts that tests run as subprocesses (under torchrun, or killed on purpose), not test modules.
collect_ignore = ["_ddp_train_worker.py", "_kill_train_worker.py"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tol(dtype: torch.dtype) -> float:
    """Relative tolerance for exactness tests, scaled by the dtype's precision."""
    return {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
