"""The plugin registry: every component bioflow can build, found through Python entry points.

Built-in components and third-party packages use the same mechanism: each declares entry points in
its own ``pyproject.toml`` under the groups of :mod:`bioflow.kinds`. Listing components reads only
package metadata (entry points stay strings); a component's module is imported on first use.

Names are resolved strictly:

- an unknown name raises :class:`~bioflow.errors.RegistryError` with the closest names and the
  command that lists all of them;
- a name that two distributions both register is never picked silently: using it raises an error
  naming both distributions, and each stays reachable by its qualified name ``distribution:name``;
- a plugin whose import fails is reported with its distribution and version, and every other
  component keeps working.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterable

from bioflow.errors import ConfigError, RegistryError, did_you_mean
from bioflow.kinds import KINDS as _KINDS

log = logging.getLogger(__name__)

#: Component kinds: name -> entry-point group (from :data:`bioflow.kinds.KINDS`, the one description).
KINDS: dict[str, str] = {k.name: k.group for k in _KINDS}
#: How one component of each kind is called in messages.
SINGULAR: dict[str, str] = {k.name: k.singular for k in _KINDS}
#: Earlier names of kinds (in checkpoints and plugins written for them) and their entry-point
#: groups, still read for one release with a deprecation warning.
RENAMED_KINDS: dict[str, str] = {legacy: k.name for k in _KINDS for legacy in k.legacy_names}
LEGACY_GROUPS: dict[str, str] = {k.name: k.legacy_groups[0] for k in _KINDS if k.legacy_groups}

QUALIFIER = ":"


def canonical_distribution(name: str) -> str:
    """Normalise a distribution name as packaging tools do (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Component:
    """One registered component: where it comes from and what it points to (not yet imported)."""

    kind: str
    name: str
    target: str
    distribution: str
    version: str

    @property
    def qualified_name(self) -> str:
        """The name that stays unique when two distributions register the same ``name``."""
        return f"{self.distribution}{QUALIFIER}{self.name}"

    @property
    def provenance(self) -> str:
        return f"distribution '{self.distribution}' {self.version}"


EntryPointSource = Callable[[str], Iterable[metadata.EntryPoint]]


def _installed_entry_points(group: str) -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=group)


class Registry:
    """Components of every kind, read from entry points on first use and cached.

    Parameters
    ----------
    entry_points
        Returns the entry points of one group; the default reads the installed distributions.
        Tests pass their own to simulate installed plugins.
    """

    def __init__(self, entry_points: EntryPointSource = _installed_entry_points) -> None:
        self._entry_points = entry_points
        self._components: dict[str, list[Component]] = {}
        self._eps: dict[tuple[str, str], metadata.EntryPoint] = {}
        self._loaded: dict[tuple[str, str], Any] = {}

    # -- discovery (metadata only) -------------------------------------------------------
    def components(self, kind: str) -> list[Component]:
        """Every component of ``kind``, clashing names included, sorted by name."""
        kind = RENAMED_KINDS.get(kind, kind)
        group = _group(kind)
        if kind not in self._components:
            found: dict[tuple[str, str], Component] = {}
            legacy = list(self._entry_points(LEGACY_GROUPS[kind])) if kind in LEGACY_GROUPS else []
            for ep in legacy:
                log.warning("%s registers '%s' under the entry-point group '%s', renamed '%s'; the old group is "
                            "read until the next release", ep.dist.name if ep.dist else "a plugin", ep.name,
                            LEGACY_GROUPS[kind], group)
            for ep in [*self._entry_points(group), *legacy]:
                dist = ep.dist
                dist_name = canonical_distribution(dist.name) if dist is not None else "unknown"
                version = dist.version if dist is not None else "unknown"
                comp = Component(kind, ep.name, ep.value, dist_name, version)
                # The same distribution can be visible twice on sys.path; count it once.
                found.setdefault((comp.distribution, comp.name), comp)
                self._eps.setdefault((kind, comp.qualified_name), ep)
            self._components[kind] = sorted(found.values(), key=lambda c: (c.name, c.distribution))
        return list(self._components[kind])

    def names(self, kind: str) -> list[str]:
        """Unique component names of ``kind``."""
        return sorted({c.name for c in self.components(kind)})

    def clashes(self, kind: str) -> dict[str, list[Component]]:
        """Names of ``kind`` registered by more than one distribution."""
        by_name: dict[str, list[Component]] = {}
        for comp in self.components(kind):
            by_name.setdefault(comp.name, []).append(comp)
        return {name: comps for name, comps in by_name.items() if len(comps) > 1}

    def resolve(self, kind: str, name: str) -> Component:
        """The component called ``name`` (plain or qualified ``distribution:name``)."""
        kind = RENAMED_KINDS.get(kind, kind)
        comps = self.components(kind)
        what = SINGULAR[kind]
        if QUALIFIER in name:
            dist, _, short = name.partition(QUALIFIER)
            dist = canonical_distribution(dist)
            for comp in comps:
                if comp.name == short and comp.distribution == dist:
                    return comp
            matches = [c for c in comps if c.name == short]
            if matches:
                offered = ", ".join(f"'{c.qualified_name}'" for c in matches)
                raise RegistryError(
                    f"{what} '{short}' is not provided by distribution '{dist}'; "
                    f"it is provided as {offered}"
                )
            raise self._unknown(kind, name)
        matches = [c for c in comps if c.name == name]
        if not matches:
            raise self._unknown(kind, name)
        if len(matches) > 1:
            sources = " and ".join(f"{c.provenance}" for c in matches)
            qualified = " or ".join(f"'{c.qualified_name}'" for c in matches)
            raise RegistryError(
                f"{what} '{name}' is registered by more than one distribution ({sources}); "
                f"name one explicitly: {qualified}"
            )
        return matches[0]

    def _unknown(self, kind: str, name: str) -> RegistryError:
        what = SINGULAR[kind]
        known = self.names(kind) + [c.qualified_name for c in self.components(kind)]
        return RegistryError(
            f"unknown {what} '{name}'{did_you_mean(name, known, n=3)} "
            f"(`bioflow plugins --kind {kind}` lists every {what})"
        )

    # -- loading (imports plugin code) ---------------------------------------------------
    def load(self, kind: str, name: str) -> Any:
        """Import and return the object behind component ``name`` of ``kind``."""
        kind = RENAMED_KINDS.get(kind, kind)
        comp = self.resolve(kind, name)
        key = (kind, comp.qualified_name)
        if key not in self._loaded:
            try:
                self._loaded[key] = self._eps[key].load()
            except Exception as exc:  # any failure inside third-party code is reported, not raised raw
                raise RegistryError(
                    f"{SINGULAR[kind]} '{comp.name}' from {comp.provenance} failed to load "
                    f"({comp.target}): {type(exc).__name__}: {exc}"
                ) from exc
        return self._loaded[key]

    def create(self, kind: str, name: str, where: str | None = None, **kwargs: Any) -> Any:
        """Build component ``name`` of ``kind`` with keyword arguments checked against its signature.

        ``where`` is the config key path the arguments come from; it prefixes error messages.
        """
        from bioflow.arguments import check_arguments

        kind = RENAMED_KINDS.get(kind, kind)
        factory = self.load(kind, name)
        label = f"{SINGULAR[kind]} '{name}'"
        check_arguments(factory, kwargs, where=where or label, label=label)
        try:
            return factory(**kwargs)
        except ValueError as exc:  # a component refusing the values of its arguments
            raise ConfigError(f"{where or label}: {label} refuses its arguments: {exc}") from exc

    def parameters(self, kind: str, name: str) -> list[str]:
        """The names of the arguments component ``name`` of ``kind`` takes (none known: [])."""
        import inspect

        try:
            return list(inspect.signature(self.load(kind, name)).parameters)
        except (TypeError, ValueError):
            return []

    def describe(self, kind: str, name: str) -> dict[str, str]:
        """Name, distribution and version of a component, for checkpoints and run tags."""
        comp = self.resolve(kind, name)
        return {
            "name": comp.name,
            "qualified_name": comp.qualified_name,
            "distribution": comp.distribution,
            "version": comp.version,
        }

    # -- in memory (notebooks, tests) ---------------------------------------------------
    def register(self, kind: str, name: str, obj: Any, distribution: str = "local") -> Component:
        """Register ``obj`` (a class or factory) as component ``name`` of ``kind`` in this process
        only, as if a distribution ``distribution`` declared it: for notebooks and tests. A name
        that clashes follows the same rules as entry points (use the qualified name); registering
        the same qualified name twice is an error. Models trained with such a component record its
        distribution, so they load only where it is registered again."""
        kind = RENAMED_KINDS.get(kind, kind)
        _group(kind)
        comp = Component(kind, name, f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', name)}",
                         canonical_distribution(distribution), "0")
        known = self.components(kind)
        if any(c.qualified_name == comp.qualified_name for c in known):
            raise RegistryError(f"{SINGULAR[kind]} '{comp.qualified_name}' is registered already")
        self._components[kind] = sorted(known + [comp], key=lambda c: (c.name, c.distribution))
        self._loaded[(kind, comp.qualified_name)] = obj
        return comp

    def unregister(self, kind: str, name: str) -> None:
        """Remove a component registered with :meth:`register`."""
        kind = RENAMED_KINDS.get(kind, kind)
        comp = self.resolve(kind, name)
        if (kind, comp.qualified_name) in self._eps:
            raise RegistryError(f"{SINGULAR[kind]} '{comp.qualified_name}' comes from an installed distribution; "
                                "only components registered in memory can be removed")
        self._components[kind] = [c for c in self._components[kind] if c != comp]
        self._loaded.pop((kind, comp.qualified_name), None)

    # -- health --------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every clash and every component whose import fails, one message each."""
        out: list[str] = []
        for kind in KINDS:
            for name, comps in self.clashes(kind).items():
                owners = " and ".join(c.provenance for c in comps)
                out.append(f"{SINGULAR[kind]} '{name}' is registered by {owners}")
            for comp in self.components(kind):
                try:
                    self.load(kind, comp.qualified_name)
                except RegistryError as exc:
                    out.append(str(exc))
        return out


def _group(kind: str) -> str:
    try:
        return KINDS[kind]
    except KeyError:
        raise RegistryError(
            f"unknown component kind '{kind}'; kinds are: {', '.join(KINDS)}"
        ) from None


#: The registry of the installed environment.
registry = Registry()
