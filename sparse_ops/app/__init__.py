"""The application: command line, fine-tuning loop, data and model loading, demo. The only part of
sparse_ops that draws plots and progress bars: its extra dependencies come with `pip install
"sparse_ops[app]"` (scripts/setup.sh installs them)."""

import importlib


def app_dependency(name: str):
    """Import `name`, one of the app extra's packages, or raise ImportError saying how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{name} is missing: the sparse_ops application (command line, fine-tuning loop) needs "
                          f"it; install it with pip install \"sparse_ops[app]\" or bash scripts/setup.sh") from exc
