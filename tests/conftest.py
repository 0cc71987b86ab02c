"""Shared test setup: the suite never touches the network, runs from the repository root, and skips the
tests marked gpu on machines without CUDA. Fixtures shared by several files live here; plain helpers in
helpers.py."""
import os
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import TINY_CLIP  # noqa: E402

from machinery import clip_text  # noqa: E402  (importable once the repository root is on the path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def encoder():
    """The tiny random CLIP text tower (seeded: the same in every process)."""
    return clip_text.TextEncoder(TINY_CLIP, "random")
