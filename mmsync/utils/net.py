"""Which local interface reaches the master of a multi-node run.

gloo and NCCL bind the address that the host name resolves to unless told
an interface (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); where the host name
resolves to loopback (Debian's ``127.0.1.1`` line, a container) the other
nodes cannot connect and the run ends in a connect timeout. The interface
that routes to MASTER_ADDR is the one the peers reach. Standard library
only: tools/misc/torchrun.py loads this file without importing mmsync.
"""
import fcntl
import ipaddress
import os
import socket
import struct
from typing import NamedTuple, Optional

SIOCGIFADDR = 0x8915  # from <linux/sockios.h>
IFNAME_VARS = ('GLOO_SOCKET_IFNAME', 'NCCL_SOCKET_IFNAME')


class NetError(ValueError):
    """MASTER_ADDR cannot serve a multi-node run; the message says why."""


class Route(NamedTuple):
    """How this node reaches the master: ``ifname`` (None for loopback)
    and the local address on it."""
    ifname: Optional[str]
    local_addr: str


def resolve(addr: str) -> str:
    """The IP address ``addr`` (a name or an address) resolves to."""
    try:
        return socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as e:
        raise NetError(f'MASTER_ADDR={addr} does not resolve ({e})') from None


def interface_of(local_addr: str) -> Optional[str]:
    """The name of the interface holding ``local_addr``, or None."""
    ip = ipaddress.ip_address(local_addr)
    for _, name in socket.if_nameindex():
        if ip.version == 4:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(
                        s.fileno(), SIOCGIFADDR,
                        struct.pack('256s',
                                    name.encode()[:15]))
                except OSError:
                    continue  # an interface without an IPv4 address
            if socket.inet_ntoa(packed[20:24]) == local_addr:
                return name
    if ip.version == 6 and os.path.exists('/proc/net/if_inet6'):
        with open('/proc/net/if_inet6', encoding='ascii') as f:
            for line in f:
                fields = line.split()
                if ipaddress.ip_address(int(fields[0],
                                            16)) == ip and len(fields) == 6:
                    return fields[5]
    return None


def route_to(master_addr: str, multi_node: bool = True) -> Route:
    """The interface and local address that reach ``master_addr``.

    Args:
        master_addr (str): MASTER_ADDR, a name or an address.
        multi_node (bool): Whether other nodes take part. A host name that
            resolves to loopback is then an error (the peers cannot reach
            it); a loopback address written as such is taken as meant
            (nodes sharing one machine). Default: True.

    Returns:
        Route: ``ifname`` is None where the master is this machine's
        loopback.

    Raises:
        NetError: The address does not resolve, resolves to loopback on a
            multi-node run, or no route leads to it.
    """
    ip = resolve(master_addr)
    if ipaddress.ip_address(ip).is_loopback:
        if multi_node and master_addr != ip:
            raise NetError(
                f'MASTER_ADDR={master_addr} resolves to the loopback address '
                f'{ip} on a multi-node run: the other nodes cannot reach it; '
                'set MASTER_ADDR to an address of node 0 that they reach')
        return Route(None, ip)
    family = socket.AF_INET6 if ':' in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))  # routing only: UDP sends nothing here
        except OSError as e:
            raise NetError(
                f'MASTER_ADDR={master_addr} ({ip}) is unreachable from this '
                f'node: {e.strerror or e}') from None
        local_addr = s.getsockname()[0]
    return Route(interface_of(local_addr), local_addr)


def export_ifname(master_addr: str, multi_node: bool = True) -> Route:
    """``route_to``, and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME set to its
    interface in ``os.environ`` unless the user set them."""
    route = route_to(master_addr, multi_node)
    if route.ifname:
        for name in IFNAME_VARS:
            os.environ.setdefault(name, route.ifname)
    return route
