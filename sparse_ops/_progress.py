"""Progress bars where tqdm is installed (the `app` extra), none otherwise: the library itself does
not depend on tqdm."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], enabled: bool = True, **kwargs) -> Iterable[T]:
    """`iterable`, wrapped in a tqdm bar when enabled and tqdm is importable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)
