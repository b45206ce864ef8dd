"""Forward hooks that never outlive the code that needs them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator


@contextmanager
def removed_on_exit(handles: Iterable) -> Iterator[None]:
    """Remove every hook handle in `handles` when the context closes, however it closes."""
    handles = list(handles)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
