"""The realtime outbox: ordered and bounded while a client reads, and never a trap once it
has gone (a producer waiting on a full outbox is released by close)."""

from __future__ import annotations

import asyncio

from agent.realtime.outbox import Outbox


async def test_events_come_out_in_order_and_none_ends_the_stream() -> None:
    box = Outbox(4)
    for i in range(3):
        await box.put({"n": i})
    await box.put(None)
    assert [await box.get() for _ in range(4)] == [{"n": 0}, {"n": 1}, {"n": 2}, None]


async def test_a_full_outbox_holds_its_producer_until_the_client_reads() -> None:
    box = Outbox(1)
    await box.put({"n": 0})
    waiting = asyncio.create_task(box.put({"n": 1}))
    await asyncio.sleep(0)
    assert not waiting.done()  # backpressure
    assert await box.get() == {"n": 0}
    await asyncio.wait_for(waiting, 1)
    assert await box.get() == {"n": 1}


async def test_close_releases_a_producer_waiting_on_a_full_outbox_and_drops_later_puts() -> None:
    box = Outbox(1)
    await box.put({"n": 0})
    stuck = [asyncio.create_task(box.put({"n": i})) for i in (1, 2)]
    await asyncio.sleep(0)
    box.close()
    await asyncio.wait_for(asyncio.gather(*stuck), 1)  # nobody waits forever
    await asyncio.wait_for(box.put({"n": 3}), 1)  # dropped at once
    assert box.closed and await box.get() is None


async def test_a_reader_waiting_on_an_empty_outbox_ends_when_it_closes() -> None:
    box = Outbox(2)
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.close()
    assert await asyncio.wait_for(reader, 1) is None
