"""Which Ray cluster a job joins: the address given, RAY_ADDRESS, the cluster last started on this machine, or
a new local Ray.

The address comes from, in this order (the order ``ray.init`` itself uses): ``--address``; ``RAY_ADDRESS`` (also
when ``--address auto``); the cluster file Ray reads, ``ray_current_cluster`` in Ray's temp dir (``/tmp/ray``, or
``$RAY_TMPDIR/ray``), written by the last ``ray start`` on this machine; else none, and a local Ray starts.

Before ``ray.init`` sees an address, its port is tried with a plain TCP connect of a few seconds: a dead address
otherwise makes ``ray.init`` retry the GCS until Ray's own connection timeout, far longer than anyone waits for a
job to start. A dead address taken only from the cluster file (a ``ray start`` cluster killed without ``ray stop``
leaves it behind) is skipped: a local Ray starts and one line says so. A dead address from ``--address`` or
``RAY_ADDRESS`` is an error (``ClusterAddressError``), one line naming the address, where it came from and what
to do.

- ``local``: a new local Ray, the cluster file unread.
- ``auto``: the cluster in the file (tried as above; dead is an error, since a cluster was asked for), else any GCS
  process running on this machine (Ray's own search), else an error.
- ``ray://HOST[:PORT]`` (Ray Client, port 10001 by default): the port is tried the same way.
- ``http(s)://...``: a dashboard (job submission) address, never one ``ray.init`` can join: an error.
- any other ``scheme://``: handed to Ray as given.

Only "something accepts connections at HOST:PORT" is tried: a live port that is not a Ray GCS is left to Ray.
"""

from __future__ import annotations

import os
import socket

CONNECT_TIMEOUT_S = 3.0
RAY_CLIENT_PORT = 10001
ENV = "RAY_ADDRESS"


class ClusterAddressError(ConnectionError):
    """The Ray cluster a job was told to join does not answer, or the address is not one Ray can join."""


def cluster_file() -> str:
    """The file ``ray.init()`` reads the last ``ray start`` cluster's address from (Ray's own lookup)."""
    from ray._private.utils import get_ray_address_file

    return get_ray_address_file(None)


def _read_cluster_file() -> str | None:
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None) or None


def bootstrap_address(address: str | None, *,
                      timeout_s: float = CONNECT_TIMEOUT_S) -> tuple[str, str | None]:
    """The address to hand ``ray.init`` and a line to print about the choice (None: nothing to say).

    Raises ``ClusterAddressError`` (one line) when the address given by ``--address`` or ``RAY_ADDRESS`` cannot be
    joined. Never returns None as the address: "local" when a local Ray is to start, so that ``ray.init`` reads
    neither RAY_ADDRESS nor the cluster file again.
    """
    env = (os.environ.get(ENV) or "").strip() or None
    flag = (address or "").strip() or None
    if flag is not None and not (flag == "auto" and env):  # as ray.init: RAY_ADDRESS overrides only None/"auto"
        return _checked(flag, "--address", "fix --address, or leave it out to start a local Ray", timeout_s)
    if env is not None:
        return _checked(env, ENV, f"fix {ENV}, or unset it to start a local Ray", timeout_s)

    stale = _read_cluster_file()
    if stale is None:
        return "local", None
    reason = _unreachable(stale, timeout_s)
    if reason is None:
        return stale, None
    return "local", (f"note: {cluster_file()} names the Ray cluster {stale}, which does not answer ({reason}; "
                     "a cluster stopped without `ray stop` leaves that file behind): starting a local Ray instead "
                     f"(delete that file to drop this note; pass --address or set {ENV} to join a cluster)")


def _checked(addr: str, source: str, fix: str, timeout_s: float) -> tuple[str, None]:
    """``addr`` (from ``source``) if a cluster answers there; else ClusterAddressError."""
    given = f"{addr} (from {source})"
    if addr == "local":
        return addr, None
    if addr == "auto":
        return _auto(given, timeout_s), None
    if addr.startswith(("http://", "https://")):
        raise ClusterAddressError(
            f"{given} is a dashboard (job submission) address, not one a job can join: {fix} "
            "(a cluster address is HOST:PORT of its GCS, 6379 by default, or ray://HOST:10001; "
            "submit with `ray job submit --address http://...` instead)")
    if "://" not in addr and _host_port(addr) is None:
        raise ClusterAddressError(f"{given} is not HOST:PORT (or ray://HOST[:PORT]): {fix}")
    reason = _unreachable(addr, timeout_s)
    if reason is not None:
        raise ClusterAddressError(f"no Ray cluster answers at {given}: {reason}; start the cluster "
                                  f"(`ray start --head` on its head node), or {fix}")
    return addr, None


def _auto(given: str, timeout_s: float) -> str:
    from ray._private.services import find_gcs_addresses

    found = _read_cluster_file()
    if found is not None:
        reason = _unreachable(found, timeout_s)
        if reason is not None:
            raise ClusterAddressError(
                f"address {given}: {cluster_file()} names the Ray cluster {found}, which does not answer ({reason}): "
                "start the cluster (`ray start --head`), delete that stale file, or pass --address HOST:PORT")
        return found
    if not find_gcs_addresses():
        raise ClusterAddressError(
            f"address {given}: no Ray cluster is running on this machine (no {cluster_file()}, no GCS process): "
            "start one (`ray start --head`), pass --address HOST:PORT, or leave --address out to start a local Ray")
    return "auto"  # Ray joins the GCS it found running here


def _host_port(addr: str, default_port: int | None = None) -> tuple[str, int] | None:
    from ray._common.network_utils import parse_address

    parsed = parse_address(addr)
    if parsed is None and default_port is not None and addr and ":" not in addr:
        parsed = (addr, str(default_port))
    if parsed is None or not parsed[0] or not parsed[1].isdigit() or not 0 < int(parsed[1]) < 65536:
        return None
    return parsed[0], int(parsed[1])


def _unreachable(addr: str, timeout_s: float) -> str | None:
    """None if something accepts a TCP connection at ``addr``'s host and port, else why not (a few words).

    A loopback host is tried as given and as the node IP that ``ray.init`` turns it into; either answering is
    enough. A scheme other than ``ray://`` is not tried (None).
    """
    from ray._private.services import resolve_ip_for_localhost

    if "://" in addr:
        scheme, _, rest = addr.partition("://")
        if scheme != "ray":
            return None
        parsed = _host_port(rest.rstrip("/"), RAY_CLIENT_PORT)
    else:
        parsed = _host_port(addr)
    if parsed is None:
        return "not HOST:PORT"
    host, port = parsed
    hosts = [host]
    try:
        resolved = resolve_ip_for_localhost(host)
    except Exception:  # noqa: BLE001 - the host as given is still tried
        resolved = host
    if resolved != host:
        hosts.append(resolved)
    reasons = []
    for h in hosts:
        reason = _tcp_probe(h, port, timeout_s)
        if reason is None:
            return None
        reasons.append(reason)
    if len(hosts) == 1:
        return reasons[0]
    if reasons[0] == reasons[1]:
        return f"{reasons[0]}, also at {hosts[1]}"
    return f"{reasons[0]}; at {hosts[1]}: {reasons[1]}"


def _tcp_probe(host: str, port: int, timeout_s: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer in {timeout_s:g} s"
    except socket.gaierror:
        return f"unknown host {host}"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
