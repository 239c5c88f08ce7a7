"""/openapi.json describes every admin route from the request models, and /docs serves
Swagger UI from the package, with nothing loaded from elsewhere."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from openapi_spec_validator import validate as validate_spec

from ratelimiter.gateway.admin import add_admin_routes
from ratelimiter.gateway.models import ACCEPTED_ONLY, REQUESTS

from ..conftest import Admin

NOT_DESCRIBED = {"/openapi.json", "/docs", "/docs/start.js", "/docs/{name}"}


def admin_routes() -> set[tuple[str, str]]:
    app = web.Application()
    add_admin_routes(app)
    return {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource.canonical not in NOT_DESCRIBED
    }


async def _document(admin: Admin) -> dict[str, Any]:
    async with admin.session.get(admin.base + "/openapi.json") as response:  # no key
        assert response.status == 200
        return await response.json()


async def test_the_document_is_openapi_3_1_and_lists_every_admin_route(admin: Admin) -> None:
    document = await _document(admin)
    assert document["openapi"] == "3.1.0"
    validate_spec(document)
    described = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert described == admin_routes()


async def test_request_bodies_are_the_models_with_every_litellm_field(admin: Admin) -> None:
    document = await _document(admin)
    schemas = document["components"]["schemas"]
    body = document["paths"]["/key/generate"]["post"]["requestBody"]["content"]
    generate = schemas[body["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert set(ACCEPTED_ONLY["key"]) - {"temp_budget_increase", "temp_budget_expiry"} <= set(
        generate["properties"]
    )
    assert generate["additionalProperties"] is False  # an unknown field is refused
    max_budget = generate["properties"]["max_budget"]["anyOf"][0]
    assert max_budget == {"type": "number", "minimum": 0, "maximum": 9007199.254740991}
    assert set(schemas) >= {m.__name__ for m in REQUESTS.values()} | {"Error"}


async def test_docs_are_served_offline_under_a_strict_policy(admin: Admin) -> None:
    async with admin.session.get(admin.base + "/docs") as response:
        assert response.status == 200
        policy = response.headers["Content-Security-Policy"]
        page = await response.text()
    assert policy.startswith("default-src 'self'")
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(s.startswith("/docs/") for s in sources)  # nothing from a CDN
    for source in sources:
        async with admin.session.get(admin.base + source) as response:
            assert response.status == 200, source
            assert len(await response.read()) > 0
    async with admin.session.get(admin.base + "/docs/start.js") as response:
        assert "/openapi.json" in await response.text()


async def test_only_the_bundles_served_files_are_reachable(admin: Admin) -> None:
    for name in ("index.j2", "..%2F..%2F__init__.py", "swagger-ui.js.map"):
        async with admin.session.get(f"{admin.base}/docs/{name}") as response:
            assert response.status == 404, name
            assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


async def test_the_documented_routes_still_need_the_master_key(admin: Admin) -> None:
    async with admin.session.post(admin.base + "/key/generate", json={}) as response:
        assert response.status == 401
