"""The admin shows live counts per room: users and sockets online, from the presence store."""

from __future__ import annotations

import asyncio
import html
import re

import httpx
import pytest

from tests.servers import ChatClient, DaphneServer, create_superuser, login

pytestmark = [pytest.mark.e2e]

WAIT_SECONDS = 10.0  # presence converges within its bounds; generous for a loaded machine


def online_cell(page: str, slug: str) -> str:
    """The text of the changelist's "online" cell in the row of room ``slug``."""
    for row in re.findall(r"<tr>.*?</tr>", page, re.S):
        if f">{slug}</a>" in row:
            cell = re.search(r'<td class="field-online">(.*?)</td>', row, re.S)
            assert cell is not None, row
            return html.unescape(cell[1]).strip()
    raise AssertionError(f"no row for {slug}")


async def test_room_changelist_counts_users_and_sockets_live(
    daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    create_superuser(sqlite_env, "root", "root-pw-1")
    alice, bob = await login(daphne.base_url, "alice"), await login(daphne.base_url, "bob")
    sockets = [
        await ChatClient.open(daphne, alice),
        await ChatClient.open(daphne, alice),
        await ChatClient.open(daphne, bob),
    ]
    async with httpx.AsyncClient(base_url=daphne.base_url, timeout=10) as admin:
        admin.headers["Cookie"] = await login(daphne.base_url, "root", "root-pw-1")

        async def cell_becomes(expected: str) -> str:
            seen = ""
            deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
            while asyncio.get_running_loop().time() < deadline:
                page = await admin.get("/admin/chat/room/")
                assert page.status_code == 200, page.status_code
                seen = online_cell(page.text, "lobby")
                if seen == expected:
                    return seen
                await asyncio.sleep(0.2)
            return seen

        # Two users, three sockets (alice has two tabs).
        assert await cell_becomes("2 / 3") == "2 / 3"
        page = await admin.get("/admin/chat/room/")
        # A room nobody is in shows a dash, not zeros.
        assert online_cell(page.text, "secret") == "-"

        await sockets[2].close()
        assert await cell_becomes("1 / 2") == "1 / 2"
        await sockets[0].close()
        assert await cell_becomes("1 / 1") == "1 / 1"
    await sockets[1].close()
