"""Fail at import, and say what and where, when something found first on sys.path hides an installed
dependency (this module checks when it is imported). A folder or module named like a dependency in
the current directory does this to everything run from there (`python -m ...`, `python -c ...` and a
REPL put that directory first), and the dependency's own import error would not say so. Only the
standard library is used here: this runs before torch is imported."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

# import name -> distribution name: what sparse_ops imports, and what transformers imports for it
DEPENDENCIES = {"torch": "torch", "triton": "triton", "numpy": "numpy", "safetensors": "safetensors",
                "transformers": "transformers", "huggingface_hub": "huggingface-hub", "kernels": "kernels"}


def shadowed_dependencies(dependencies: dict[str, str] = DEPENDENCIES) -> list[str]:
    """One sentence per installed dependency that its import name does not reach: where the name
    resolves instead, and where the installed package is."""
    problems = []
    for name, dist_name in dependencies.items():
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed = os.path.realpath(dist.locate_file(os.path.join(name, "__init__.py")))
        if not os.path.isfile(installed):  # an editable install or another layout: nothing to compare
            continue
        spec = importlib.util.find_spec(name)
        found = spec.origin if spec is not None and spec.has_location else None
        if found is None and spec is not None and spec.submodule_search_locations:
            found = list(spec.submodule_search_locations)[0]  # a namespace package: its first folder
        if found is not None and os.path.realpath(found) != installed:
            problems.append(f"{found!r} shadows the installed {dist_name} {dist.version} "
                            f"({os.path.dirname(installed)!r})")
    return problems


def check_dependencies_not_shadowed() -> None:
    """Raise ImportError naming every shadowed dependency (see shadowed_dependencies)."""
    problems = shadowed_dependencies()
    if problems:
        raise ImportError("sparse_ops cannot use its dependencies: " + "; ".join(problems) + ". Python finds the "
                          "former first on sys.path (the current directory comes first under `python -m` and "
                          "`python -c`): rename or move it, or run from another directory")


check_dependencies_not_shadowed()
