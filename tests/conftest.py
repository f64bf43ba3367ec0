"""Shared pytest setup: seeded RNGs, small thread counts, and the gpu marker's auto-skip."""

import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ.get("LABCORE_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
