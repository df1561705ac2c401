"""PEP 562 lazy re-exports: a package names its public objects without importing their modules.

`import musicvae.losses` must not pull in Lightning, matplotlib or torchaudio, so no package
`__init__` imports its modules eagerly; each maps a public name to the module that defines it,
and the module is imported on first access.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable


def lazy_exports(package: str, exports: dict[str, str],
                 submodules: Iterable[str] = ()) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`.

    Args:
        package: the package's `__name__`.
        exports: public name -> module (relative to `package`) that defines it.
        submodules: subpackages or modules reachable as attributes (`musicvae.training`).

    Returns:
        The pair to assign to the package's `__getattr__` and `__dir__`.
    """
    submodules = frozenset(submodules)

    def __getattr__(name: str) -> object:
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later accesses skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports) | submodules)

    return __getattr__, __dir__
