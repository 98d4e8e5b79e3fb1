"""A name -> class registry with a class decorator, shared by the SDEs and the networks."""
from __future__ import annotations

from typing import Dict, List, Optional


class Registry:
    """``register(name)`` decorates a class (and sets ``cls.<attr> = name``); ``get(name)`` returns it, or raises one
    ``ValueError`` listing what is available."""

    def __init__(self, kind: str, attr: str = "name"):
        self.kind, self.attr = kind, attr
        self._classes: Dict[str, type] = {}

    def register(self, name: str):
        def deco(cls):
            if name in self._classes:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._classes[name] = cls
            setattr(cls, self.attr, name)
            return cls
        return deco

    def names(self) -> List[str]:
        return sorted(self._classes)

    def get(self, name: str, shown: Optional[str] = None) -> type:
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {shown or name!r}; available: {', '.join(self.names())}")
        return self._classes[name]
