"""Rate and concurrency limits with key → tenant inheritance (SPEC §4.2)."""

from __future__ import annotations

from attrs import field, frozen
from attrs.validators import ge, optional

WINDOW_S = 60


@frozen
class Limits:
    """Caps for a key or a tenant. None on a key means: use the tenant's value.

    rpm: requests per sliding minute; tpm: prompt+completion tokens per sliding minute;
    concurrent: requests in flight. On a tenant, None means unlimited.
    """

    rpm: int | None = field(default=None, validator=optional(ge(0)))
    tpm: int | None = field(default=None, validator=optional(ge(0)))
    concurrent: int | None = field(default=None, validator=optional(ge(0)))

    def over(self, tenant: Limits) -> Limits:
        """The key's effective limits: its own values where set, else the tenant's."""
        return Limits(
            rpm=tenant.rpm if self.rpm is None else self.rpm,
            tpm=tenant.tpm if self.tpm is None else self.tpm,
            concurrent=tenant.concurrent if self.concurrent is None else self.concurrent,
        )
