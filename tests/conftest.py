"""Shared test set-up: 8 virtual CPU devices, JAX's persistent compilation cache, the sample data path."""
import os
from pathlib import Path

from tests.children import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
# JAX's persistent compilation cache, set through the environment so that the `python -m bmgpt_jax.train`
# children the tests spawn (same tiny config, same step) share it too: one compile per program per run
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def shared_data_dir() -> Path | None:
    """../shared/data beside the repo, or $BMGPT_SHARED_DATA; None when neither exists."""
    env = os.environ.get("BMGPT_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("sample data not found (../shared/data or $BMGPT_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch
