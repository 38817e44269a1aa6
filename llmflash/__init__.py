"""llmflash: run language models larger than the memory they may use (LLM in a flash)."""

__version__ = "0.1.0"
