"""The one OpenVINO ``Core`` of the process: every read and compile here goes through it.

OpenVINO's CPU plugin (2026.4, Linux) gives the thread that creates a ``Core`` a new alternate
signal stack (``SigAltStackSetup``: mmap, ``sigaltstack``) and, when that Core's plugin goes,
sets back the stack it found and unmaps its own. Two Cores dropped in the order they were made
leave the thread's alternate stack pointing at unmapped memory, and the next signal that Python
handles there (its handlers run ``SA_ONSTACK``: Ctrl-C, the SIGTERM that
``guards.StopOnSignal`` turns into a checkpoint) kills the process with SIGSEGV instead. One
Core kept for the life of the process is never dropped, so its stack stays mapped.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def core() -> Any:
    """The process's ``openvino.Core`` (made on first use, never dropped)."""
    import openvino as ov  # noqa: PLC0415 (the export extra)

    return ov.Core()
