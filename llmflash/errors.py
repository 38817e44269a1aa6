"""One exception type for every user-facing failure, so the CLI can print it without a traceback."""

from __future__ import annotations


class LLMFlashError(Exception):
    """A problem the user can act on (bad input, corrupt file, budget too small).

    The message names the problem and, where there is one, the file.
    """
