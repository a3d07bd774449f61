"""Waiting in tests: poll a condition with a deadline, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

_R = TypeVar("_R")


def wait_for(
    check: Callable[[], _R],
    what: str,
    timeout_s: float = 20.0,
    *,
    every_s: float = 0.05,
    details: Sequence[Callable[[], str]] = (),
) -> _R:
    """Return `check()`'s first truthy result; on timeout fail naming `what`, followed by
    the tail of each of `details` (e.g. the logs of the processes involved)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "\n".join(detail()[-3000:] for detail in details)
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tails}")
        time.sleep(every_s)
