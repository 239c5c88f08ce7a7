"""The admission deadline's ``run``: its timer is armed only once the call waits, and it must
then behave exactly as ``async with`` the deadline around ``await`` would."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from ratelimiter import Engine
from ratelimiter.errors import RedisUnavailable
from ratelimiter.gateway.config import Settings
from ratelimiter.gateway.http import ENGINE, SETTINGS
from ratelimiter.gateway.proxy import _AdmissionDeadline

from ..conftest import MASTER_KEY


@pytest.fixture
def app(engine: Engine) -> web.Application:
    app = web.Application()
    app[ENGINE], app[SETTINGS] = engine, Settings(master_key=MASTER_KEY, redis_timeout_s=0.05)
    return app


def deadline(app: web.Application, seconds: float) -> _AdmissionDeadline:
    return _AdmissionDeadline(app, asyncio.get_running_loop().time() + seconds)


async def _waiting(event: asyncio.Event, seen: list[str]) -> str:
    try:
        await event.wait()
        return "answered"
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise


async def test_a_call_that_never_waits_answers_even_past_the_deadline(
    app: web.Application,
) -> None:
    async def cached() -> str:
        return "cached"

    assert await deadline(app, -1).run(cached()) == "cached"


async def test_a_call_that_waits_answers_within_the_deadline(app: web.Application) -> None:
    event, seen = asyncio.Event(), []
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await deadline(app, 5).run(_waiting(event, seen)) == "answered"
    assert seen == []


async def test_a_call_that_waits_past_the_deadline_is_cancelled_and_unavailable(
    app: web.Application,
) -> None:
    seen: list[str] = []
    with pytest.raises(RedisUnavailable, match=r"no answer within 0\.05s") as raised:
        await deadline(app, 0.02).run(_waiting(asyncio.Event(), seen))
    assert seen == ["cancelled"] and raised.value.__suppress_context__


async def test_a_cancelled_request_cancels_the_call_it_waits_on(app: web.Application) -> None:
    seen: list[str] = []
    task = asyncio.create_task(deadline(app, 5).run(_waiting(asyncio.Event(), seen)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


async def test_a_timeout_of_the_call_itself_is_unavailable_as_before(
    app: web.Application,
) -> None:
    async def times_out() -> None:
        raise TimeoutError

    with pytest.raises(RedisUnavailable):
        await deadline(app, 5).run(times_out())


async def test_an_error_of_the_call_passes_through_after_it_waited(app: web.Application) -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("its own")

    with pytest.raises(ValueError, match="its own"):
        await deadline(app, 5).run(fails())
