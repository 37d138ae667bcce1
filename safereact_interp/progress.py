"""Progress reporting that the library accepts and the CLI fills in with tqdm bars.

Library functions take a `progress` factory: called with a description and a total, it returns a
context manager yielding a function that advances the bar. The default reports nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], ContextManager[Advance]]


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Advance]:
    yield lambda n: None


@contextmanager
def tqdm_progress(description: str, total: int) -> Iterator[Advance]:
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit="it", leave=False, dynamic_ncols=True) as bar:
        yield bar.update
