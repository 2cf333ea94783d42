"""The API documents itself usably: ``/docs`` works offline (Swagger UI's assets are served by the
API itself, never a CDN) and the OpenAPI document spells path parameters like the bodies."""

from __future__ import annotations

import re

from tests.api.conftest import Api


async def test_docs_page_and_its_assets_are_served_locally(api: Api) -> None:
    page = await api.client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources, page.text
    assert all(s.startswith("/docs/assets/") for s in sources), sources
    assert "cdn" not in page.text.lower() and "https://" not in page.text.replace(
        "https://swagger.io", ""
    )
    for source in sources:
        asset = await api.client.get(source)
        assert asset.status_code == 200, source
        assert len(asset.content) > 500, source
    assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text


async def test_openapi_names_path_parameters_in_camel_case(api: Api) -> None:
    """Path parameters are spelt like the bodies' fields (``workflowId``, not ``workflow_id``)."""
    doc = (await api.client.get("/openapi.json")).json()
    names = {
        p["name"]
        for path in doc["paths"].values()
        for operation in path.values()
        for p in operation.get("parameters", [])
        if p["in"] == "path"
    }
    assert names, "no path parameters found"
    assert not [n for n in names if "_" in n], names
    assert {"workflowId", "executionId", "scheduleId", "tenantId", "keyId"} <= names
