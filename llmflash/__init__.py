"""llmflash: run language models larger than the memory they may use (LLM in a flash).

    import llmflash
    m = llmflash.load("path/to/model", mode="flash", memory="50%")
    print(m.generate("What is the capital of France?").text)

`load`, `convert`, `Model` and `Generation` live in llmflash.api and are imported on first use, so
that `import llmflash` (and the CLI's argument parsing) stays fast: torch loads only when needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmflash.errors import LLMFlashError

__version__ = "0.2.0"
__all__ = ["load", "convert", "Model", "Generation", "LLMFlashError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from llmflash.api import Generation, Model, convert, load


def __getattr__(name: str) -> Any:
    if name in ("load", "convert", "Model", "Generation"):
        from llmflash import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmflash' has no attribute {name!r}")
