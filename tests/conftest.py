"""Shared test settings: small thread pools so the suite behaves on 2 cores."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(2)

# help texts are cached per test session, never in the user's ~/.cache
if "GRCM_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["GRCM_CACHE_DIR"] = tempfile.mkdtemp(prefix="grcm-cache-")


import pytest  # noqa: E402


@pytest.fixture
def single_thread():
    """Tiny tensors: one intra-op thread avoids synchronisation overhead on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
