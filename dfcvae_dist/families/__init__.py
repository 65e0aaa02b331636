"""The registry of model families: the built-ins of this package, and those other installed packages register
under the entry point group `dfcvae_dist.families` (the entry point's name is the `model.name`, its object a
`ModelFamily`), so a family of your own needs no change here (docs/extending.md)."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from importlib.metadata import entry_points

from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.families.base import ModelFamily

ENTRY_POINT_GROUP = "dfcvae_dist.families"
_plugins_loaded: dict[str, ModelFamily] = {}  # by entry point value (module:object)

__all__ = ["ModelFamily", "family_names", "get_family", "ENTRY_POINT_GROUP"]


@functools.cache
def builtin_families() -> dict[str, ModelFamily]:
    """Every module of this package that exposes `FAMILY`, by the family's name: a new built-in is one new file."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        family = getattr(importlib.import_module(f"{__name__}.{module.name}"), "FAMILY", None)
        if family is not None:
            found[family.name] = family
    return found


def _plugins() -> dict:
    """Entry points of installed packages, by name (found afresh each call: a package can appear at run time)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in builtin_families()}


def family_names() -> list[str]:
    """Every family's `model.name`: the built-ins, then the plug-ins, each in name order."""
    return [*sorted(builtin_families()), *sorted(_plugins())]


def get_family(name: str) -> ModelFamily:
    """The family of `model.name` (a plug-in's is imported on first use)."""
    if name in builtin_families():
        return builtin_families()[name]
    plugin = _plugins().get(name)
    if plugin is None:
        raise UserError(f"model.name: no model family '{name}'; known: {', '.join(family_names())}")
    if plugin.value not in _plugins_loaded:
        _plugins_loaded[plugin.value] = _load_plugin(plugin)
    return _plugins_loaded[plugin.value]


def _load_plugin(plugin) -> ModelFamily:
    name = plugin.name
    try:
        family = plugin.load()
    except Exception as err:  # noqa: BLE001 - any error of someone else's package, in one line
        raise UserError(f"model family '{name}' (entry point {plugin.value}) does not load: {one_line(err)}") from None
    if not isinstance(family, ModelFamily) or family.name != name:
        raise UserError(f"entry point '{name}' = {plugin.value} in group {ENTRY_POINT_GROUP} is not a ModelFamily "
                        f"named '{name}'")
    return family
