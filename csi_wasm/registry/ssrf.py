"""Which addresses the node may contact on a registry's behalf (SSRF from pods and hostile registries).

Link-local and cloud-metadata addresses are never contacted. Private, loopback,
CGNAT and unique-local addresses are contacted only as the registry itself (a pod
may name an in-cluster registry; a loopback registry only if the node
configuration names it under ``registries``), as a place the registry redirects to
or names as its token realm *when the registry's own address is in that same
private block* (a registry on 127.0.0.1 may use a token server on 127.0.0.1; a
public registry may not point the node at 10.0.0.5), or when the node
configuration lists the block in ``allowed_private_networks``.

Host names are resolved and every address they resolve to must pass. An IPv6 address
that carries an IPv4 one (mapped, compatible, translated, NAT64, 6to4, Teredo) must
pass as that IPv4 address too: ``64:ff9b::a9fe:a9fe`` is the metadata service seen
through a NAT64 gateway.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import urllib.parse
from typing import Iterable

from csi_wasm.errors import AccessDenied
from csi_wasm.reference import Reference

FORBIDDEN_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local, cloud metadata
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::/32"),  # AWS IPv6 metadata
    ipaddress.ip_network("fd20:ce::254/128"),  # GCP IPv6 metadata
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba metadata
    ipaddress.ip_network("192.0.0.192/32"),  # Oracle Cloud metadata
    ipaddress.ip_network("168.63.129.16/32"),  # Azure host agent (WireServer)
)
# Contacted only as the registry itself, or when the registry is in the same block,
# or when the node configuration allows the block (allowed_private_networks).
PRIVATE_NETWORKS = (
    ipaddress.ip_network("0.0.0.0/8"),  # "this host": 0.0.0.0 reaches loopback services on Linux
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT, also some cluster networks
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("198.18.0.0/15"),  # benchmarking, used inside some clouds
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fc00::/7"),  # unique local
)
LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "::/128", "::1/128"))
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def hostname_of(host: str) -> str:
    """``host[:port]`` (IPv6 literals in brackets) -> the host name or address alone."""
    return urllib.parse.urlsplit(f"//{host}").hostname or host


def resolve(host: str) -> set[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself); empty if it does not."""
    host = host.strip("[]")
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
        return {_unmapped(literal)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError):
        return set()
    found: set[IPAddress] = set()
    for info in infos:
        with contextlib.suppress(ValueError):
            found.add(_unmapped(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])))
    return found


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: compatible (::a.b.c.d), translated (::ffff:0:a.b.c.d),
    NAT64 (64:ff9b::a.b.c.d, RFC 6052/8215), 6to4 (2002:AABB:CCDD::) and Teredo (server and client)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    value, low = int(ip), ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    found = []
    if (value >> 32 == 0 and value > 1) or value >> 32 == 0xFFFF0000 or any(ip in n for n in _NAT64):
        found.append(low)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def _views(ip: IPAddress) -> list[IPAddress]:
    return [ip, *embedded_ipv4(ip)]


def forbidden_reason(
    addresses: Iterable[IPAddress], origin: Iterable[IPAddress] | None, allowed: Iterable[IPNetwork] = ()
) -> str | None:
    """Why these destination addresses may not be contacted, or None. Pure: tests drive it directly.

    ``origin`` is the registry's own addresses when the destination was named by the
    registry (a redirect or a token realm); None when the destination is the registry.
    """
    allowed = tuple(allowed)
    origin = tuple(view for o in origin for view in _views(o)) if origin is not None else None
    for ip in (view for address in addresses for view in _views(address)):
        if any(ip in network for network in FORBIDDEN_NETWORKS):
            return f"{ip} is a link-local/metadata address"
        if origin is None or any(ip in network for network in allowed if network.version == ip.version):
            continue
        block = next((n for n in PRIVATE_NETWORKS if n.version == ip.version and ip in n), None)
        if block is not None and not any(o.version == ip.version and o in block for o in origin):
            return f"{ip} is in the private block {block}, which the registry itself is not in"
    return None


def refuse_local_registry(host: str, ref: Reference, allowed: Iterable[IPNetwork] = ()) -> None:
    """A pod may not point the privileged driver at the node's own loopback services.

    Loopback registries are for admins: naming the registry under ``registries`` in the
    node configuration (or its block in ``allowed_private_networks``) allows it.
    """
    allowed = tuple(allowed)
    for ip in (view for address in resolve(host) for view in _views(address)):
        if any(ip in n for n in LOCAL_NETWORKS) and not any(ip in n for n in allowed if n.version == ip.version):
            raise AccessDenied(
                f"image {ref}: registry {host[:100]} is a loopback address ({ip}); a pod may not name one. "
                "A cluster admin can allow it by listing the registry under `registries` in the node configuration"
            )


def refuse_forbidden_host(
    host: str, what: str, origin: str | None = None, allowed: Iterable[IPNetwork] = ()
) -> None:
    """Refuse to contact ``host`` if it resolves to a forbidden address (SSRF from a hostile registry).

    A host that does not resolve is let through: the request itself then fails with
    a clear connection error.
    """
    addresses = resolve(host)
    reason = forbidden_reason(addresses, resolve(origin) if origin is not None else None, allowed)
    if reason is not None:
        raise AccessDenied(f"{what} points at {host[:100]} ({reason}); refused")
