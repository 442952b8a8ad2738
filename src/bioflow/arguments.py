"""Check keyword arguments from a config against a callable's signature, before calling it.

Components are configured as ``name`` plus keyword arguments. A misspelt argument or a value of the
wrong type must fail before training starts, with the config key path in the message, instead of as
a ``TypeError`` deep inside the component (or not at all).
"""

from __future__ import annotations

import collections.abc
import inspect
import os
import pathlib
import types
import typing
from typing import Any, Callable, Mapping

from bioflow.errors import ConfigError, did_you_mean

# Annotations that a config string satisfies.
_PATH_TYPES = (os.PathLike, pathlib.Path, pathlib.PurePath)
_UNION_ORIGINS = (typing.Union, getattr(types, "UnionType", typing.Union))

def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: check names only, not types
        return {}


def check_arguments(
    factory: Callable[..., Any],
    kwargs: Mapping[str, Any],
    *,
    where: str,
    label: str,
    provided: frozenset[str] = frozenset(),
) -> None:
    """Raise :class:`ConfigError` if ``kwargs`` cannot be passed to ``factory``.

    Parameters
    ----------
    factory
        The component's class or function.
    kwargs
        Arguments from the config.
    where
        Config key path of the component (``model``, ``loss`` ...), used in messages.
    label
        What the component is, e.g. ``model 'unet'``.
    provided
        Argument names that bioflow supplies itself (they may be absent from ``kwargs``).
    """
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check against
    params = sig.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        n: p
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    if not accepts_any:
        for key in kwargs:
            if key not in named:
                valid = ", ".join(sorted(named)) or "none"
                raise ConfigError(
                    f"{where}.{key}: {label} has no argument '{key}'{did_you_mean(key, named)} (its arguments: {valid})"
                )
    missing = [
        n
        for n, p in named.items()
        if p.default is inspect.Parameter.empty and n not in kwargs and n not in provided
    ]
    if missing:
        raise ConfigError(f"{where}: {label} needs argument(s) {', '.join(missing)}")
    hints = _type_hints(factory)
    for key, value in kwargs.items():
        if key in hints and not matches_type(value, hints[key]):
            raise ConfigError(
                f"{where}.{key}: expected {describe_type(hints[key])}, got {value!r} "
                f"({type(value).__name__})"
            )


def matches_type(value: Any, annotation: Any) -> bool:
    """Whether a config value fits a type annotation; unknown annotations accept anything."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return any(matches_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(matches_type(v, a) for v, a in zip(value, args))
        return all(matches_type(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            return all(matches_type(k, args[0]) and matches_type(v, args[1]) for k, v in value.items())
        return True
    if annotation in _PATH_TYPES:
        return isinstance(value, (str, os.PathLike))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # a typing construct bioflow does not interpret: leave it to the component


def describe_type(annotation: Any) -> str:
    """A short human-readable form of a type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is not None:
        inner = ", ".join(describe_type(a) for a in args if a is not Ellipsis)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{inner}]" if inner else name
    return getattr(annotation, "__name__", str(annotation))


def absolute_path_arguments(factory: Callable[..., Any], kwargs: Mapping[str, Any], base: str | os.PathLike) -> dict[str, Any]:
    """``kwargs`` with every string argument annotated as a path made absolute against ``base``.

    A run records its config; relative paths in it would point elsewhere when the model is
    evaluated from another folder.
    """
    hints = _type_hints(factory)
    out = dict(kwargs)
    for key, value in kwargs.items():
        annotation = hints.get(key)
        options = typing.get_args(annotation) if typing.get_origin(annotation) in _UNION_ORIGINS else (annotation,)
        if isinstance(value, str) and any(a in _PATH_TYPES for a in options):
            out[key] = str((pathlib.Path(base) / pathlib.Path(value).expanduser()).resolve())
    return out
