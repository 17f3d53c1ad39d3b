"""The listening socket and the uvicorn server that `sam-jax demo` runs the app on.

The socket is bound before the weights load, so that a port already in use is said at once, and
listens from just before the address is printed, so that a client that reads the line and
connects is queued rather than refused.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Tuple


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; port 0 takes a free one. Raises
    ValueError for a host that names no address, OSError (with the address in its message) for
    one that cannot be bound: a port in use, or an address of no interface of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn's own sockets: a restart may bind while the last run's connections linger in
        # TIME_WAIT; a port that another process listens on stays refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        error = OSError(f"cannot listen on {_netloc(host, port)}: {e.strerror or e}")
        error.errno = e.errno
        raise error from None
    return sock


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_line(prog: str, model: str, sock_name: Tuple[Any, ...]) -> str:
    """The one line `sam-jax demo` prints once it listens: the URL to open and, unless the server
    listens on a loopback address only, that other machines can reach it."""
    host, port = sock_name[0], sock_name[1]
    ip = ipaddress.ip_address(host.split("%")[0])
    if ip.is_unspecified:
        shown = "127.0.0.1" if ip.version == 4 else "::1"
        where = f" - listening on ALL network interfaces ({host}): other machines can use it"
    elif ip.is_loopback:
        shown, where = host, ""
    else:
        shown, where = host, f" - listening on {host}, reachable from other machines"
    return f"{prog}: serving {model} on http://{_netloc(shown, port)}{where} (Ctrl+C to stop)"


def server(app: Any) -> Any:
    """A uvicorn server for the app: its own log quiet but for warnings and errors (the address
    line is printed by the caller), and stopped within 2 s of Ctrl+C even while a request waits on
    the model."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    return uvicorn.Server(config)
