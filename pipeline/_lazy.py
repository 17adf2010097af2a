"""A module proxy that imports on first attribute access.

`latent-train` must reject a bad config in well under a second, and importing torch alone takes
seconds; pipeline/train.py binds `torch`/`np` through this proxy so that config and data checks in
main() run before torch is imported, while the module's code keeps writing `torch.x`.
"""
from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """`LazyModule("torch").cuda` imports torch then returns `torch.cuda`."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _load(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str):
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
