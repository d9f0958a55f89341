"""Which IP addresses are public: the address rules of `pipeline.io.netguard`.

An address is refused when it is not a public unicast one: loopback, private (10/8,
172.16/12, 192.168/16, fc00::/7), link-local, carrier-grade NAT (100.64/10), multicast,
broadcast, unspecified, reserved and other special-purpose ranges, and IPv6 forms embedding
such an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16).
"""

from __future__ import annotations

import ipaddress
from typing import TypeAlias

__all__ = ["IPAddress", "address_reason", "parse_ip"]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_V4_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_V4_PRIVATE = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
)
_V4_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_V6_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V6_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_V6_6TO4 = ipaddress.IPv6Network("2002::/16")
_V6_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_V6_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def parse_ip(text: str) -> IPAddress | None:
    """`text` as an IP address if it is one in canonical notation (no `127.1` forms)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _v4_reason(ip: ipaddress.IPv4Address) -> str | None:
    if ip.is_unspecified:
        return "an unspecified address"
    if ip in _V4_THIS_NETWORK:
        return "a 'this network' (0.0.0.0/8) address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip in _V4_CGNAT:
        return "a carrier-grade NAT (100.64.0.0/10) address"
    if any(ip in net for net in _V4_PRIVATE):
        return "a private address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == _V4_BROADCAST:
        return "a broadcast address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private or not ip.is_global:
        return "a special-purpose (non-public) address"
    return None


def _embedded(reason: str | None, how: str, v4: ipaddress.IPv4Address) -> str | None:
    return None if reason is None else f"{reason} ({how} {v4})"


def _v6_reason(ip: ipaddress.IPv6Address) -> str | None:
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return _embedded(_v4_reason(mapped), "IPv4-mapped", mapped)
    bare = ipaddress.IPv6Address(int(ip))  # without a scope id, for the network tests
    if bare in _V6_IPV4_COMPATIBLE:
        return f"an IPv4-compatible IPv6 address ({ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)})"
    if bare in _V6_NAT64:
        v4 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        return _embedded(_v4_reason(v4), "NAT64 of", v4)
    if bare in _V6_NAT64_LOCAL:
        return "a local-use NAT64 address"
    sixtofour = ip.sixtofour
    if sixtofour is not None:
        return _embedded(_v4_reason(sixtofour), "6to4 of", sixtofour)
    if ip.is_link_local:
        return "a link-local address"
    if bare in _V6_SITE_LOCAL:
        return "a site-local address"
    if bare in _V6_UNIQUE_LOCAL:
        return "a private (unique local) address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_reserved or bare not in _V6_GLOBAL_UNICAST:
        return "a reserved address"
    if ip.is_private or not ip.is_global:
        return "a special-purpose (non-public) address"
    return None


def address_reason(ip: str) -> str | None:
    """Why `ip` is not a public address (`"a loopback address"`), or None if it is."""
    parsed = parse_ip(ip)
    if parsed is None:
        return "not a valid IP address"
    if isinstance(parsed, ipaddress.IPv4Address):
        return _v4_reason(parsed)
    return _v6_reason(parsed)
