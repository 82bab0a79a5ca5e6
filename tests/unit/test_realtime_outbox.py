"""The realtime outbox: session events ahead of response audio, each response's events in
order, audio bounded, held and dropped by generation, and never a trap once the client has
gone (a producer waiting on a full outbox is released by close)."""

from __future__ import annotations

import asyncio

from agent.realtime.outbox import Outbox


def audio(n: int) -> dict[str, object]:
    return {"type": "response.output_audio.delta", "n": n}


async def drain(box: Outbox) -> list[dict[str, object]]:
    box.finish()
    out = []
    while (event := await box.get()) is not None:
        out.append(event)
    return out


async def test_events_come_out_in_order_and_finish_ends_the_stream() -> None:
    box = Outbox(4, 1000)
    for i in range(3):
        await box.put({"n": i})
    assert await drain(box) == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_session_events_go_ahead_of_queued_response_audio() -> None:
    box = Outbox(16, 10_000)
    for n in range(3):
        await box.put(audio(n), 1, audio_ms=100)
    await box.put({"type": "input_audio_buffer.speech_started"})
    await box.put({"type": "response.done"}, 1)
    assert [e.get("n", e["type"]) for e in await drain(box)] == \
        ["input_audio_buffer.speech_started", 0, 1, 2, "response.done"]


async def test_unsent_audio_is_bounded_in_time_and_the_producer_waits() -> None:
    box = Outbox(100, 300)
    for n in range(3):
        await box.put(audio(n), 1, audio_ms=100)
    waiting = asyncio.create_task(box.put(audio(3), 1, audio_ms=100))
    await asyncio.sleep(0)
    assert not waiting.done()  # 300 ms unsent: synthesis waits for the client
    await box.put({"type": "response.output_audio_transcript.delta"}, 1)  # text never waits
    assert (await box.get())["n"] == 0
    await asyncio.wait_for(waiting, 1)
    assert box.sent_audio_ms(1) == 100


async def test_a_cancelled_generation_loses_its_unsent_audio_and_keeps_its_other_events() -> None:
    box = Outbox(100, 10_000)
    await box.put(audio(0), 1, audio_ms=100)
    assert (await box.get())["n"] == 0
    for n in (1, 2):
        await box.put(audio(n), 1, audio_ms=100)
    await box.put({"type": "response.output_item.done"}, 1)
    box.cancel(1)
    await box.put(audio(3), 1, audio_ms=100)  # produced after the cancel: dropped too
    await box.put({"type": "response.done"}, 1)
    await box.put(audio(0), 2, audio_ms=100)  # the next response is untouched
    assert [e.get("n", e["type"]) for e in await drain(box)] == \
        ["response.output_item.done", "response.done", 0]
    assert box.sent_audio_ms(1) == 100


async def test_a_cancel_releases_a_producer_waiting_for_audio_room() -> None:
    box = Outbox(100, 100)
    await box.put(audio(0), 1, audio_ms=100)
    waiting = asyncio.create_task(box.put(audio(1), 1, audio_ms=100))
    await asyncio.sleep(0)
    box.cancel(1)
    await asyncio.wait_for(waiting, 1)
    assert await drain(box) == []


async def test_held_audio_waits_while_session_events_flow_and_release_lets_it_go() -> None:
    box = Outbox(100, 10_000)
    await box.put(audio(0), 1, audio_ms=100)
    box.hold(1)
    await box.put({"type": "input_audio_buffer.speech_started"})
    assert (await box.get())["type"] == "input_audio_buffer.speech_started"
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not reader.done()  # the audio waits for the verdict on the speech
    box.release(1)
    assert (await asyncio.wait_for(reader, 1))["n"] == 0


async def test_a_full_outbox_holds_its_producer_until_the_client_reads() -> None:
    box = Outbox(1, 1000)
    await box.put({"n": 0})
    waiting = asyncio.create_task(box.put({"n": 1}))
    await asyncio.sleep(0)
    assert not waiting.done()  # backpressure
    assert await box.get() == {"n": 0}
    await asyncio.wait_for(waiting, 1)
    assert await box.get() == {"n": 1}


async def test_close_releases_a_producer_waiting_on_a_full_outbox_and_drops_later_puts() -> None:
    box = Outbox(1, 1000)
    await box.put({"n": 0})
    await box.put(audio(0), 1, audio_ms=100)
    stuck = [asyncio.create_task(box.put({"n": i})) for i in (1, 2)]
    stuck.append(asyncio.create_task(box.put(audio(1), 1, audio_ms=100)))
    await asyncio.sleep(0)
    box.close()
    await asyncio.wait_for(asyncio.gather(*stuck), 1)  # nobody waits forever
    await asyncio.wait_for(box.put({"n": 3}), 1)  # dropped at once
    assert box.closed and await box.get() is None


async def test_a_reader_waiting_on_an_empty_outbox_ends_when_it_closes() -> None:
    box = Outbox(2, 1000)
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.close()
    assert await asyncio.wait_for(reader, 1) is None
