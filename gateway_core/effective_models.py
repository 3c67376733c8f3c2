"""The model policy (SPEC §4.7): which discovered models a tenant may call, by Ollama's naming rules."""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen


def canonical(name: str) -> str:
    """Ollama's matching form: case-insensitive, and a missing tag means `:latest`."""
    name = name.strip().lower()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def is_cloud(name: str) -> bool:
    """Models Ollama forwards to a hosted service under the server owner's account."""
    last = canonical(name).rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[-1]
    return tag == "cloud" or tag.endswith("-cloud")


@frozen
class EffectiveModels:
    """A tenant's callable models, keyed by canonical name, valued by the name Ollama listed."""

    by_canonical: dict[str, str]

    @classmethod
    def resolve(
        cls, allowed: Iterable[str], allow_all: bool, discovered: Iterable[str]
    ) -> EffectiveModels:
        """allowed ∩ discovered, or every discovered non-cloud model with allow_all.

        Cloud models resolve only when named explicitly in *allowed*; an empty discovery
        set resolves nothing (fail-closed, SPEC §4.6).
        """
        found = {canonical(n): n for n in discovered}
        wanted = {canonical(n) for n in allowed}
        chosen = {c: n for c, n in found.items() if c in wanted or (allow_all and not is_cloud(c))}
        return cls(by_canonical=chosen)

    def lookup(self, requested: str) -> str | None:
        """The upstream name for *requested*, or None when it is not callable."""
        return self.by_canonical.get(canonical(requested))

    def names(self) -> list[str]:
        return sorted(self.by_canonical.values())
