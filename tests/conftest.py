import os
import secrets

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when a
# kernel is decorated, so it is set here, before any test module imports l2l_fused.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: minutes of CPU time")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test and run (L2L_TEST_SEED=n reproduces one); it is printed, so a failure shows it."""
    value = int(os.environ.get("L2L_TEST_SEED", secrets.randbelow(2**31)))
    print(f"{request.node.nodeid}: L2L_TEST_SEED={value}")
    torch.manual_seed(value)
    return value


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run in this session: the GPU, or the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
