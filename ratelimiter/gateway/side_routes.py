"""Routes beside the metered path that still reach an upstream: the Responses API's retrieve,
delete, cancel and input items. None of them generates tokens, so none is admitted or charged;
each authenticates, checks the key made the response (and may still use its model), and passes
the upstream's answer through. (Anthropic's ``/v1/messages/count_tokens`` generates nothing
either, but Anthropic limits its requests: it takes the metered path as a surface of its own,
surfaces/messages.py.)

Who made which response is kept in Redis (``<prefix>response:<id>``: the deployment and the
key, for 30 days, as long as OpenAI keeps a stored response), so a response is reached only
through the deployment that made it and only by the key that made it (or the master key).
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from ..errors import EntityError
from .config import Deployment
from .http import HTTP, SETTINGS, STORE, bearer
from .resolver import Caller, authenticate, check_model_access
from .surfaces import SURFACES

__all__ = ["add_side_routes", "carried_tokens"]

log = logging.getLogger("ratelimiter.proxy")

KEEP_ANSWER_S = 30 * 24 * 3600
RESPONSES = SURFACES["responses"]


def _answer_key(app: web.Application, answer_id: str) -> str:
    return f"{app[SETTINGS].key_prefix}response:{answer_id}"


def _owner(caller: Caller) -> str:
    return "master" if caller.master else caller.token or ""


async def _remember_answer(call: Any, caller: Caller, deployment: Deployment, answer: str) -> None:
    """Who made response ``answer``, where it lives and the tokens it carries into a turn that
    continues it (its input and output); a failure costs only its retrieval."""
    usage = call.usage
    carried = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    record = msgpack.packb([deployment.index, deployment.model, _owner(caller), carried])
    try:
        await call.app[STORE].redis.set(_answer_key(call.app, answer), record, ex=KEEP_ANSWER_S)
    except Exception as exc:  # the answer is given; only retrieving it later needs this
        log.warning("could not record who made response %s: %s", answer, exc)


async def carried_tokens(app: web.Application, caller: Caller, answer: str) -> int:
    """The tokens a request continuing response ``answer`` (``previous_response_id``) carries
    from it: its recorded input and output, which the upstream bills again as input. An
    EntityError when the response was not made through this rate limiter by this key: its
    size is unknown, so the request could not be held soundly."""
    raw = await app[STORE].redis.get(_answer_key(app, answer))
    record = msgpack.unpackb(raw) if raw else None
    if record is None or (not caller.master and record[2] != _owner(caller)):
        raise EntityError(
            400,
            f"previous_response_id {answer!r} is not a response made through this rate "
            "limiter with this key (responses are kept for 30 days): the tokens it carries "
            "could not be held",
            "previous_response_id",
        )
    # a record made before the size was kept has 3 fields
    return int(record[3]) if len(record) > 3 else 0


async def stored_response(request: web.Request) -> web.StreamResponse:
    """GET/DELETE /v1/responses/{id}, GET …/input_items, POST …/cancel."""
    settings = request.app[SETTINGS]
    caller = await authenticate(request.app[STORE], settings, bearer(request))
    answer = request.match_info["response_id"]
    raw = await request.app[STORE].redis.get(_answer_key(request.app, answer))
    record = msgpack.unpackb(raw) if raw else None
    if record is None or (not caller.master and record[2] != _owner(caller)):
        raise EntityError(
            404,
            f"no response {answer!r} made through this rate limiter with this key "
            "(responses are kept for 30 days)",
            "response_id",
        )
    index, model = record[0], record[1]
    deployment = next((d for d in settings.models if d.index == index), None)
    if deployment is None:
        raise EntityError(404, f"the deployment that made response {answer!r} is gone")
    deployment = Deployment(
        deployment.model_name, model, deployment.api_base, deployment.api_key, index=index
    )
    check_model_access(caller, deployment, settings)
    tail = request.match_info.get("tail", "")
    url = f"{deployment.base_url}/responses/{answer}{tail}"
    headers = RESPONSES.upstream_headers(request, deployment)
    body = await request.read() if request.method == "POST" else None
    response = await _pass(request, request.method, url, headers, body, query=request.query_string)
    if request.method == "DELETE" and response.status < 300:
        await request.app[STORE].redis.delete(_answer_key(request.app, answer))
    return response


async def _pass(
    request: web.Request,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    *,
    query: str = "",
) -> web.StreamResponse:
    """The upstream's answer, passed through as it comes (a stream included)."""
    if query:
        url = f"{url}?{query}"
    try:
        async with request.app[HTTP].request(method, url, data=body, headers=headers) as upstream:
            kind = upstream.headers.get("Content-Type", "application/json")
            if "text/event-stream" not in kind:
                raw = await upstream.read()
                return web.Response(
                    body=raw, status=upstream.status, headers={"Content-Type": kind}
                )
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": kind})
            await response.prepare(request)
            async for data in upstream.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, OSError) as exc:
        message = f"the upstream could not be reached: {type(exc).__name__}"
        raise EntityError(502, message) from None


def add_side_routes(app: web.Application, prefix: str) -> None:
    if prefix == "/anthropic/v1":
        return
    one = f"{prefix}/responses/{{response_id}}"
    app.router.add_get(one, stored_response)
    app.router.add_delete(one, stored_response)
    app.router.add_get(one + "{tail:/input_items}", stored_response)
    app.router.add_post(one + "{tail:/cancel}", stored_response)
