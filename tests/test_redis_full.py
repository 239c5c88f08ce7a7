"""A Redis out of memory under noeviction refuses writes: the sidecar answers 503 on the proxy
and the admin API with a message that says so, takes nothing, and admits again once memory is
freed."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
import redis

from ratelimiter import RedisServer
from ratelimiter.engine.embedded import free_port

from .conftest import MASTER_KEY, Admin, one_model, running_sidecar, running_upstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_a_full_redis_is_a_503_that_takes_nothing(
    tmp_path: Path, ns: str, policy: str
) -> None:
    """Even under on_redis_error: allow: a Redis that answers but will not write is no outage
    to ride out, and nothing is admitted unchecked."""
    server = RedisServer(tmp_path, port=free_port(), appendonly=False).start()
    client = redis.Redis(port=server.port)
    try:
        async with running_upstream() as upstream:
            settings = one_model(ns, upstream, on_redis_error=policy)
            async with running_sidecar(settings, server.url) as base, aiohttp.ClientSession() as s:
                created = await Admin(s, base).post("/key/generate", {"rpm_limit": 10})
                headers = {"Authorization": f"Bearer {created['key']}"}
                url = f"{base}/v1/chat/completions"
                async with s.post(url, json=CHAT, headers=headers) as response:
                    assert response.status == 200
                client.config_set("maxmemory-policy", "noeviction")
                client.config_set("maxmemory", 1)  # below what is used: every write is refused
                async with s.post(url, json=CHAT, headers=headers) as response:
                    body = await response.json()
                    assert response.status == 503, body
                    assert "out of memory" in body["error"]["message"], body
                    assert "maxmemory" in body["error"]["message"], body
                async with s.post(
                    f"{base}/key/generate",
                    json={"rpm_limit": 1},
                    headers={"Authorization": f"Bearer {MASTER_KEY}"},
                ) as response:
                    body = await response.json()
                    assert response.status == 503, body
                    assert "out of memory" in body["error"]["message"], body
                client.config_set("maxmemory", 0)
                async with s.post(url, json=CHAT, headers=headers) as response:
                    assert response.status == 200
                    # Two admitted: the refused one in between took nothing.
                    assert response.headers["x-ratelimit-remaining-requests"] == "8"
    finally:
        client.close()
        server.stop()
