from __future__ import annotations

from dataclasses import dataclass

from ..presence import Entry


@dataclass(frozen=True)
class Snapshot:
    entries: list[Entry]
    # Changes when the store lost its data (a Redis restart): holders then re-add their entries.
    epoch: str


class BasePresenceStore:
    """Connection entries per room, each with its own expiry time (epoch seconds).

    Subclasses implement the four coroutines; every method may raise on a store outage, and
    callers (the presence hub) retry on their next heartbeat or sweep.
    """

    async def add(self, room_id: int, entries: list[Entry]) -> None:
        """Insert or refresh entries (a refresh re-creates entries a reset store lost)."""
        raise NotImplementedError

    async def remove(self, room_id: int, entry: Entry) -> None:
        raise NotImplementedError

    async def snapshot(self, room_id: int, now: float) -> Snapshot:
        """Live entries of the room (expired ones are dropped) and the store's epoch."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections held for the running event loop."""
