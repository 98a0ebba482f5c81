import pytest
import torch

from omnimamba.mamba2 import Mamba2LM, preset


@pytest.fixture
def tiny_config():
    # ngroups 2, a chunk that does not divide the test lengths, untied head: the general case.
    return preset("mamba2-tiny", ngroups=2, chunk_size=8, tie_embeddings=False)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return Mamba2LM(tiny_config, backend="reference").eval()
