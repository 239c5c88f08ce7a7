"""The baseline: an aiohttp pass-through proxy that checks nothing.

    python -m benchmarks.bare_proxy --port 4001 --upstream http://127.0.0.1:8000/v1

It forwards every request under /v1 to the upstream with one pooled client session and streams
the answer back chunk by chunk: what any proxy has to do, with the same libraries and event loop
as the sidecar. The sidecar's cost is what it adds over this.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
    uvloop = None

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
# Hop-by-hop and length headers are the proxy's own to set.
DROPPED = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[SESSION] = session
        yield


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
    url = request.app[UPSTREAM] + request.path.removeprefix("/v1")
    async with request.app[SESSION].request(
        request.method, url, data=await request.read(), headers=headers
    ) as upstream:
        reply_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROPPED}
        if upstream.content_type != "text/event-stream":
            return web.Response(
                body=await upstream.read(), status=upstream.status, headers=reply_headers
            )
        response = web.StreamResponse(status=upstream.status, headers=reply_headers)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def create_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024**2)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--upstream", required=True, help="the upstream's /v1 base URL")
    args = parser.parse_args(argv)
    web.run_app(
        create_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop() if uvloop else None,
    )


if __name__ == "__main__":
    main()
