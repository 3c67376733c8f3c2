"""The caller's address behind load balancers (SPEC §4.11): the per-IP auth limit and
`audit_log.client_ip` use it.

Only a TCP peer inside TRUSTED_PROXIES may name the client, with `X-Forwarded-For` or, when that is
absent, `Forwarded` (RFC 7239). Each proxy appends the address it saw, so the list is read from the
right: the first address that is not itself a trusted proxy is the client. Everything to the left of
it was written by that client and proves nothing. A value that cannot be read ends the walk at the
last proxy we trust, so garbage can make the limit stricter (it lands on the proxy) but never looser.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence

from aiohttp import web
from attrs import frozen

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@frozen
class TrustedProxies:
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """A comma-separated CIDR list (a bare address means just that host); ValueError names the bad
        entry."""
        networks: list[Network] = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                net = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an address or CIDR block") from None
            networks.append(net)
        return cls(tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: Address) -> bool:
        return any(address in net for net in self.networks)


def _address(text: str) -> Address | None:
    """An address from a header or peer value: bare, `[v6]`, `[v6]:port`, `v4:port`; else None."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not text[end + 1:].startswith(":")):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # an IPv4 address with a port; IPv6 has at least two colons
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return address


def _split_outside_quotes(text: str, sep: str) -> Iterator[str]:
    start, quoted, escaped = 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out, escaped = [], False
        for char in inner:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


def _forwarded_hops(values: Sequence[str]) -> list[str]:
    """The `for=` value of every element, in order; an element without one counts as unreadable."""
    hops: list[str] = []
    for value in values:
        for element in _split_outside_quotes(value, ","):
            if not element.strip():
                continue
            found = ""
            for pair in _split_outside_quotes(element, ";"):
                name, eq, raw = pair.partition("=")
                if eq and name.strip().lower() == "for":
                    found = _unquote(raw)
                    break
            hops.append(found)
    return hops


def _forwarded_for_hops(values: Sequence[str]) -> list[str]:
    return [hop for value in values for hop in value.split(",") if hop.strip()]


def client_address(peer: str | None, forwarded_for: Sequence[str], forwarded: Sequence[str],
                   trusted: TrustedProxies) -> str:
    """The client's address for a request from TCP *peer* carrying these header values (every
    occurrence of each header, in order)."""
    if not trusted:
        return peer or ""
    nearest = _address(peer or "")
    if nearest is None or not trusted.trusts(nearest):
        return peer or ""
    hops = _forwarded_for_hops(forwarded_for) if forwarded_for else _forwarded_hops(forwarded)
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        nearest = address
        if not trusted.trusts(address):
            break
    return str(nearest)


def client_address_of(request: web.Request, trusted: TrustedProxies) -> str:
    if not trusted:
        return request.remote or ""
    headers = request.headers
    return client_address(request.remote, headers.getall("X-Forwarded-For", []),
                          headers.getall("Forwarded", []), trusted)
