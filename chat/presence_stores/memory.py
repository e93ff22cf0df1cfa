from __future__ import annotations

from ..presence import Entry
from .base import BasePresenceStore, Snapshot


class MemoryPresenceStore(BasePresenceStore):
    """Entries in this process's memory: right for one process (the in-memory channel layer)."""

    def __init__(self) -> None:
        self._rooms: dict[int, dict[str, Entry]] = {}

    async def add(self, room_id: int, entries: list[Entry]) -> None:
        room = self._rooms.setdefault(room_id, {})
        for entry in entries:
            room[entry.conn_id] = entry

    async def remove(self, room_id: int, entry: Entry) -> None:
        room = self._rooms.get(room_id)
        if room is not None:
            room.pop(entry.conn_id, None)
            if not room:
                del self._rooms[room_id]

    async def snapshot(self, room_id: int, now: float) -> Snapshot:
        room = self._rooms.get(room_id, {})
        for conn_id in [c for c, e in room.items() if e.expires_at <= now]:
            del room[conn_id]
        return Snapshot(entries=list(room.values()), epoch="memory")
