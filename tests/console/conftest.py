"""Fixtures for the console tests: the API's in-process fixtures, and a signed-in client."""

from __future__ import annotations

import re

import httpx

from tests.api.conftest import ADMIN_TOKEN, Api, api, api_env, migrated_pg  # noqa: F401

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, token: str = ADMIN_TOKEN) -> httpx.Response:
    """Sign ``client`` in through the form (as a browser does); the answer to the POST."""
    page = await client.get("/console/sign-in")
    return await client.post(
        "/console/sign-in", data={"csrf": csrf_of(page.text), "token": token, "next": "/console"}
    )
