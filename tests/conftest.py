import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # Two-thread OpenMP on a loaded 2-core machine stalls on tiny ops; one thread keeps test time steady.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
