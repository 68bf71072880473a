"""Which Ray cluster a job joins: the address given, RAY_ADDRESS, the cluster last started on this machine, or
a new local Ray."""

from __future__ import annotations


def bootstrap_address(address: str | None) -> tuple[str | None, str | None]:
    """The address to hand ``ray.init`` and a line to print about the choice (None: nothing to say)."""
    return address, None
