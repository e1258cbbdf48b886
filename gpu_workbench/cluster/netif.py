"""Which network interface gloo binds to, chosen per node from the address the other nodes reach it at.

    pin_gloo_interface("10.77.0.2")    # sets GLOO_SOCKET_IFNAME=wbvB here, unless the user already set it

Without GLOO_SOCKET_IFNAME gloo binds to what the hostname resolves to, and falls back to loopback when
that address is not local; on hosts that share a hostname (network namespaces, some clusters) or whose
hostname resolves to another network, the ranks then cannot reach each other. The address a node is
reached at (torchrun's --local-addr, the Ray node IP) names the right interface. Where no local interface
carries that address (it is NATed) nothing is set and gloo keeps its hostname rule (docs/ARCHITECTURE.md,
Slurm test cluster).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

_SIOCGIFADDR = 0x8915   # Linux ioctl: an interface's IPv4 address


def _ipv4_of(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:   # down, or no IPv4 address
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_of(addr: str) -> str | None:
    """The local interface whose IPv4 address is `addr` (a name is resolved first), or None."""
    try:
        ip = socket.gethostbyname(addr)
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == ip:
            return name
    return None


def pin_gloo_interface(addr: str, env: dict | None = None) -> str | None:
    """Set GLOO_SOCKET_IFNAME in `env` (default os.environ) to the interface carrying `addr`, unless it is
    set already; returns the interface gloo will use, or None (gloo's own choice)."""
    env = os.environ if env is None else env
    if env.get("GLOO_SOCKET_IFNAME"):
        return env["GLOO_SOCKET_IFNAME"]
    name = interface_of(addr) if addr else None
    if name:
        env["GLOO_SOCKET_IFNAME"] = name
    return name
