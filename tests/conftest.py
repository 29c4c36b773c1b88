"""Shared test set-up: decide where kernels run before anything imports triton; skip GPU tests on CPUs."""
import pytest
import torch

from companion import runtime  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
