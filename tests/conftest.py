"""Shared fixtures."""

import os
from pathlib import Path

import pytest
import torch

#: Where the shared real data lives when VIDSSL_DAVIS_ROOT is not set: ../shared/data next to the repository.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def davis_sample_root() -> Path | None:
    """The real DAVIS-2016 sample: ``$VIDSSL_DAVIS_ROOT``, else ``../shared/data/davis2016-sample``; None when absent."""
    env = os.environ.get("VIDSSL_DAVIS_ROOT")
    root = Path(env) if env else SHARED_DATA / "davis2016-sample"
    return root.resolve() if (root / "JPEGImages" / "480p").is_dir() else None


@pytest.fixture(scope="session")
def davis_sample() -> Path:
    """The real DAVIS-2016 sample root (12 sequences, 480p); the test is skipped when it is absent. Read only: link
    or read its files, never copy them into the repository."""
    root = davis_sample_root()
    if root is None:
        pytest.skip("DAVIS-2016 sample not found (set VIDSSL_DAVIS_ROOT or provide ../shared/data/davis2016-sample)")
    return root


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """The real sample videos next to the DAVIS sample (``<data>/videos``); skipped when absent."""
    env = os.environ.get("VIDSSL_DAVIS_ROOT")
    root = (Path(env).parent if env else SHARED_DATA) / "videos"
    if not root.is_dir():
        pytest.skip(f"shared sample videos not found ({root})")
    return root.resolve()


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread-pool thrash on a shared CPU (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
