"""Name -> plugin registries, in the style of timm's ``_registry.py``.

A plugin is a class registered under a name with ``@REGISTRY.register("name")``.
It declares its parameters as a frozen dataclass ``Params`` so that a config such
as ``{name: constant, eps: 0.1}`` is checked field by field: an unknown name or an
unknown parameter fails at load time, listing what is known.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from typing import Any, Callable, Generic, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration error; the CLI prints it on one line and exits 2."""


# Echoes of user values in messages are bounded *while* they are written: a YAML alias bomb or a
# 1 MiB string must not become a 300 MB error line (or a MemoryError) before it could be cut.
_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = _ECHO.maxlong = 120
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxset = _ECHO.maxfrozenset = _ECHO.maxdict = 8
_ECHO.maxlevel = 3


def brief(value: Any, limit: int = 200) -> str:
    """``repr(value)``, at most ``limit`` characters, built without the whole repr."""
    try:
        text = _ECHO.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int past Python's 4300-digit str limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class NoParams:
    """The parameter set of a plugin that takes none."""


class Registry(Generic[T]):
    """A named collection of plugin classes of one kind (mass, structure, model...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            if not hasattr(cls, "Params"):
                cls.Params = NoParams
            self._entries[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> type:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {brief(name)}; known: {', '.join(self.names())}"
            )
        return self._entries[name]

    def params(self, name: str, values: Mapping[str, Any]) -> Any:
        """Build and type-check the ``Params`` dataclass of plugin ``name``."""
        cls = self.get(name).Params
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(fields))
        if unknown:
            allowed = ", ".join(fields) or "none"
            raise ConfigError(
                f"{self.kind} '{name}' has no parameter {brief(unknown[0])}; allowed: {allowed}"
            )
        checked = {k: _coerce(self.kind, name, k, hints[k], v) for k, v in values.items()}
        try:
            return cls(**checked)
        except ValueError as e:  # raised by __post_init__ range checks
            raise ConfigError(f"{self.kind} '{name}': {e}") from None

    def build(self, name: str, values: Mapping[str, Any] | None = None) -> T:
        return self.get(name)(self.params(name, values or {}))


def _coerce(kind: str, name: str, field: str, want: Any, value: Any) -> Any:
    """Accept ints for float fields; reject every other type mismatch."""
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{kind} '{name}' parameter '{field}' must be a finite number, got {value}")
    if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"{kind} '{name}' parameter '{field}' must be {getattr(want, '__name__', want)}, "
            f"got {type(value).__name__} {brief(value)}"
        )
    return value
