"""Registries for the recipe's axes.

A recipe picks one value per axis (base storage, what trains, how updates are computed). Each value is
registered once, with its typed config class, by the module that implements it:

    @ADAPTERS.register("lora", LoraConfig)
    class LoraMethod: ...

Adding a method is therefore one module plus one registration; the recipe parser, the trainer and
the CLI look values up here and never name a method.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> (implementation, config class) for one axis of the recipe."""

    def __init__(self, axis: str) -> None:
        self.axis = axis
        self._impl: dict[str, T] = {}
        self._config: dict[str, type] = {}

    def register(self, name: str, config_cls: type) -> Callable[[T], T]:
        def deco(impl: T) -> T:
            if name in self._impl:
                raise ValueError(f"{self.axis} '{name}' is registered twice")
            self._impl[name] = impl
            self._config[name] = config_cls
            return impl

        return deco

    def names(self) -> list[str]:
        return sorted(self._impl)

    def _check(self, name: str, field: str) -> None:
        if name not in self._impl:
            raise ConfigError(
                f"{field}: unknown {self.axis} kind '{name}' (expected one of: {', '.join(self.names())})"
            )

    def config_class(self, name: str, field: str | None = None) -> type:
        self._check(name, field or f"{self.axis}.kind")
        return self._config[name]

    def get(self, name: str, field: str | None = None) -> T:
        self._check(name, field or f"{self.axis}.kind")
        return self._impl[name]

    def __contains__(self, name: Any) -> bool:
        return name in self._impl
