"""Test environment: no network, no W&B prompts, small thread pools (CI has 2 cores)."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PUFFIN_DIR = SHARED_DATA / "traces" / "deepseek-v2-lite-puffin"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    no_shared = pytest.mark.skip(reason=f"../shared/data not found at {SHARED_DATA}")
    for item in items:
        if "gpu" in item.keywords and not _cuda_available():
            item.add_marker(no_gpu)
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(no_shared)


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def puffin_dir() -> Path:
    if not (PUFFIN_DIR / "csv.tar.xz").exists():
        pytest.skip(f"Puffin traces not found at {PUFFIN_DIR}")
    return PUFFIN_DIR


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test: on shared CI cores a second intra-op thread only adds
    wake-up latency to tiny tensors."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
