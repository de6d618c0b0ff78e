import pytest
import torch

# The test models are tiny: one thread is faster than two for them, and it keeps runs steady on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
