import pytest
import torch


@pytest.fixture(scope="session")
def single_rank():
    """One-process gloo group with megatron parallel state (TP=1, PP=1), shared by the session."""
    from nemo_rlsr.distributed.parallel import init_distributed

    return init_distributed(tp=1, pp=1, seed=1234)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
