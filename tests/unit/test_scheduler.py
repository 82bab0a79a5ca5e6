"""The scheduler with the real SmolLM2: batching, cancellation, sessions, rollback, limits."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch

from agent.decoder.generate import Delta
from agent.decoder.sampling import SamplingParams
from agent.decoder.scheduler import MIN_SHARED_PREFIX, GenerationRequest, Scheduler
from agent.errors import InvalidRequestError, ParleyError
from tests.decoder_fixtures import QUESTION, fp32_engine, gguf_path

PROMPTS = ("The three primary colours are", "def add(a, b):\n", "My favourite season is",
           "Water boils at")


@pytest.fixture(scope="module", params=["fp32", "cpu", "triton"])
def engine(request, settings, tmp_path_factory):
    """Every decoding path: the PyTorch ground truth, the CPU kernels whose one-call
    attention and blocks write the cache themselves, and the Triton kernels with their
    float16 cache and the decode step CUDA graphs capture (batching, rollback and prefix
    copies must hold for all). Triton runs a tiny random-weight model with SmolLM2's
    tokenizer (tests/tiny_model.py): in the interpreter the real one would take minutes
    a step."""
    from agent.decoder.engine import load_engine

    if request.param == "fp32":
        return fp32_engine("smollm2")
    if request.param == "cpu":
        return load_engine("smollm2", settings=settings, backend="cpu", progress=False)
    pytest.importorskip("triton")
    from tests.tiny_model import write_tiny_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny-q4_1.gguf"
    write_tiny_gguf(path, gguf_path("smollm2"))
    return load_engine(path, settings=settings, backend="triton", progress=False)


@pytest.fixture(scope="module")
def scheduler(engine):
    sched = Scheduler(engine, max_streams=6, max_seq_len=512, prefill_chunk=16)
    yield sched
    sched.close()


async def collect(sched: Scheduler, request: GenerationRequest) -> tuple[str, list[int], Delta]:
    text, ids, last = "", [], None
    async for delta in sched.generate(request):
        text += delta.text
        ids += delta.token_ids
        last = delta
    assert last is not None and last.finish_reason is not None
    return text, ids, last


def raw(engine, text: str, session: str | None = None, **params) -> GenerationRequest:
    return GenerationRequest(prompt_ids=engine.tokenizer.encode(text), session_id=session,
                             params=SamplingParams(**{"max_tokens": 8, **params}))


async def settle(sched: Scheduler, timeout: float = 30.0) -> None:
    """Wait until the worker has nothing in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = sched.stats()
        if st["decoding"] == st["prefilling"] == st["waiting"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"scheduler still busy: {sched.stats()}")


async def test_concurrent_greedy_streams_equal_their_solo_runs(engine, scheduler):
    solo = [await collect(scheduler, raw(engine, p)) for p in PROMPTS]
    together = await asyncio.gather(*(collect(scheduler, raw(engine, p)) for p in PROMPTS))
    assert [t[1] for t in together] == [s[1] for s in solo]
    assert [t[0] for t in together] == [s[0] for s in solo]
    assert scheduler.stats()["largest_batch"] >= 3  # they really shared decode steps


async def test_seeded_sampling_does_not_depend_on_the_batch(engine, scheduler):
    seeded = raw(engine, PROMPTS[0], temperature=1.0, seed=11)
    alone = await collect(scheduler, seeded)
    with_others = await asyncio.gather(collect(scheduler, seeded),
                                       *(collect(scheduler, raw(engine, p)) for p in PROMPTS[1:]))
    assert with_others[0][1] == alone[1]


async def test_cancelling_stops_within_one_step_and_keeps_the_cache_consistent(
        engine, scheduler):
    steps = []

    def observe(generated):  # called on the worker once per sampled token
        steps.append(len(generated))
        return None

    prompt = engine.tokenizer.encode("Here is a long story about a dragon:")
    request = GenerationRequest(prompt_ids=prompt, session_id="cancel-me",
                                params=SamplingParams(max_tokens=200, mask_fn=observe))
    received: list[int] = []
    stream = scheduler.generate(request)
    async with contextlib.aclosing(stream):
        async for delta in stream:
            received += delta.token_ids
            if len(received) == 3:
                at_cancel = len(steps)
                break
    await settle(scheduler)
    assert len(steps) - at_cancel <= 1
    held = await scheduler.session_tokens("cancel-me")
    assert held[:len(prompt)] == prompt
    generated = held[len(prompt):]
    # Positions hold exactly the tokens fed back: a prefix of what was sampled.
    assert len(generated) <= len(steps) - 1 and generated == received[:len(generated)]
    # A later turn on that cache continues exactly like a fresh cache would.
    follow = raw(engine, "Here is a long story about a dragon: it", session="cancel-me")
    fresh = raw(engine, "Here is a long story about a dragon: it")
    cont, fresh_out = await collect(scheduler, follow), await collect(scheduler, fresh)
    assert cont[1] == fresh_out[1] and cont[2].usage.cached_tokens > 0


async def test_cancelling_the_task_frees_the_stream(engine, scheduler):
    first = asyncio.Event()

    async def consume():
        async for _ in scheduler.generate(raw(engine, PROMPTS[1], max_tokens=200)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(scheduler)


async def test_next_turn_prefills_only_the_new_tokens(engine, scheduler):
    turn1 = list(QUESTION)
    req1 = GenerationRequest(messages=turn1, session_id="chat",
                             params=SamplingParams(max_tokens=12))
    reply, _, last1 = await collect(scheduler, req1)
    assert last1.usage.cached_tokens == 0
    held = await scheduler.session_tokens("chat")  # the prompt and the reply's own ids
    turn2 = [*turn1, {"role": "assistant", "content": reply},
             {"role": "user", "content": "And of Italy?"}]
    params = SamplingParams(max_tokens=10)
    again = await collect(scheduler, GenerationRequest(messages=turn2, session_id="chat",
                                                       params=params))
    fresh = await collect(scheduler, GenerationRequest(messages=turn2, params=params))
    assert again[1] == fresh[1]
    usage = again[2].usage
    assert usage.cached_tokens >= last1.usage.prompt_tokens
    # Everything the session holds that the new prompt starts with is reused: the reply
    # too, as far as its ids are the ones its text encodes to (a trained model's are; a
    # random model's need not be, which is why this is counted, not a constant).
    prompt2 = engine.tokenizer.encode_chat(turn2)
    shared = next((i for i, (a, b) in enumerate(zip(held, prompt2, strict=False)) if a != b),
                  min(len(held), len(prompt2)))
    assert usage.cached_tokens >= min(shared, len(prompt2) - 1)
    assert shared >= last1.usage.prompt_tokens


async def test_a_shared_prefix_is_copied_from_another_session(engine):
    """Two sessions opened with the same long instructions: the second copies their keys
    and values from the first, answers as if it had computed them, and the first is intact."""
    system = {"role": "system",
              "content": "You are Pip, the help desk of a bicycle shop in Leeds. " * 8}

    def turn(question: str) -> GenerationRequest:
        return GenerationRequest(messages=[system, {"role": "user", "content": question}],
                                 session_id=question, params=SamplingParams(max_tokens=8))

    shared = Scheduler(engine, max_streams=3, max_seq_len=512, prefill_chunk=32)
    alone = Scheduler(engine, max_streams=3, max_seq_len=512, prefill_chunk=32)
    try:
        first = await collect(shared, turn("Do you repair brakes?"))
        second = await collect(shared, turn("When do you open?"))
        reference = await collect(alone, turn("When do you open?"))
        assert reference[2].usage.cached_tokens == 0
        instructions = len(engine.tokenizer.encode_chat([system]))
        assert second[2].usage.cached_tokens >= max(instructions - 4, MIN_SHARED_PREFIX)
        assert second[1] == reference[1]
        again = await collect(shared, turn("Do you repair brakes?"))
        assert again[1] == first[1]
    finally:
        shared.close()
        alone.close()


async def test_requests_without_a_session_reuse_the_last_ones_prefix(engine):
    """A stateless client resending a growing conversation (a chat completion's tool
    rounds) prefills only what is new, and answers as a fresh scheduler would."""
    system = {"role": "system", "content": "You book tables at Luigi's in Turin. " * 10}
    first = [system, {"role": "user", "content": "A table for two tonight?"}]
    shared = Scheduler(engine, max_streams=2, max_seq_len=512, prefill_chunk=32)
    alone = Scheduler(engine, max_streams=2, max_seq_len=512, prefill_chunk=32)
    params = SamplingParams(max_tokens=8)
    try:
        reply, _, last1 = await collect(shared, GenerationRequest(messages=first,
                                                                  params=params))
        second = [*first, {"role": "assistant", "content": reply},
                  {"role": "user", "content": "At eight, please."}]
        again = await collect(shared, GenerationRequest(messages=second, params=params))
        reference = await collect(alone, GenerationRequest(messages=second, params=params))
        assert again[2].usage.cached_tokens >= last1.usage.prompt_tokens
        assert again[1] == reference[1]
        # Sessionless slots give way first: a named session outlives them.
        await collect(shared, raw(engine, "Hello there", session="kept", max_tokens=2))
        await collect(shared, raw(engine, "Something else entirely", max_tokens=2))
        await collect(shared, raw(engine, "Hello again", session="new", max_tokens=2))
        assert await shared.session_tokens("kept")
    finally:
        shared.close()
        alone.close()


async def test_truncate_rolls_the_session_back(engine, scheduler):
    request = raw(engine, "Roses are red, violets are", session="rollback")
    first = await collect(scheduler, request)
    held = await scheduler.session_tokens("rollback")
    assert len(held) > 10
    assert await scheduler.truncate("rollback", 5) == 5
    assert await scheduler.session_tokens("rollback") == held[:5]
    second = await collect(scheduler, request)
    assert second[1] == first[1] and second[2].usage.cached_tokens == 5


async def test_conversation_outgrowing_the_context_keeps_the_system_prompt(engine):
    small = Scheduler(engine, max_streams=2, max_seq_len=192, prefill_chunk=64)
    try:
        system = {"role": "system", "content": "You are a terse assistant named Pip."}
        messages = [system]
        for i in range(12):
            messages += [{"role": "user", "content": f"Question {i}: tell me about number {i}."},
                         {"role": "assistant", "content": f"Number {i} is a fine number. " * 3}]
        messages.append({"role": "user", "content": "What is your name?"})
        assert len(engine.tokenizer.encode_chat(messages)) > 192
        _, _, last = await collect(small, GenerationRequest(
            messages=messages, session_id="long", params=SamplingParams(max_tokens=8)))
        assert last.finish_reason in ("stop", "length")
        prompt = engine.tokenizer.decode(await small.session_tokens("long"))
        assert prompt.startswith("system\nYou are a terse assistant named Pip.")
        assert "What is your name?" in prompt and "Question 0:" not in prompt
    finally:
        small.close()


async def test_idle_sessions_are_evicted_least_recently_used_first(engine):
    small = Scheduler(engine, max_streams=2, max_seq_len=128)
    try:
        for sid in ("a", "b", "c"):
            await collect(small, raw(engine, "Hello there", session=sid, max_tokens=2))
        assert await small.session_tokens("a") == []
        assert await small.session_tokens("b") and await small.session_tokens("c")
        again = await collect(small, raw(engine, "Hello there", session="a", max_tokens=2))
        assert again[2].usage.cached_tokens == 0
    finally:
        small.close()


async def test_a_failing_mask_hook_ends_only_its_own_stream(engine, scheduler):
    def broken(generated):
        if len(generated) >= 2:
            raise RuntimeError("grammar exploded")
        return None

    bad = GenerationRequest(prompt_ids=engine.tokenizer.encode(PROMPTS[2]),
                            params=SamplingParams(max_tokens=8, mask_fn=broken))
    good = raw(engine, PROMPTS[3])
    expected = await collect(scheduler, good)
    results = await asyncio.gather(collect(scheduler, bad), collect(scheduler, good),
                                   return_exceptions=True)
    assert isinstance(results[0], ParleyError) and "grammar exploded" in results[0].message
    assert results[1][1] == expected[1]


async def test_a_failing_step_is_a_503_naming_the_decoder_and_the_worker_lives_on(engine):
    """A decode step that raises (out of GPU memory, a kernel failing) ends the streams
    in it with a 503 saying the decoder broke; the next request is served."""
    sched = Scheduler(engine, max_streams=2, max_seq_len=256)
    real = sched._decode
    calls = 0

    def failing_once(*args):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args)

    sched._decode = failing_once
    try:
        with pytest.raises(ParleyError) as caught:
            await collect(sched, raw(engine, PROMPTS[0]))
        assert caught.value.status == 503 and caught.value.code == "model_unavailable"
        assert "decoder failed a step" in caught.value.message
        assert "illegal memory access" in caught.value.message
        _, ids, last = await collect(sched, raw(engine, PROMPTS[0]))
        assert last.finish_reason in ("length", "stop") and ids
    finally:
        sched.close()


async def test_mask_hook_constrains_batched_streams(engine, scheduler):
    tok = engine.tokenizer
    digits = torch.tensor([bool(tok.token_bytes(i)) and tok.token_bytes(i).isdigit()
                           for i in range(engine.args.vocab_size)])
    masked = GenerationRequest(prompt_ids=tok.encode(PROMPTS[0]),
                               params=SamplingParams(max_tokens=5, mask_fn=lambda g: digits))
    results = await asyncio.gather(collect(scheduler, masked), collect(scheduler,
                                                                       raw(engine, PROMPTS[1])))
    assert results[0][0].isdigit()


@pytest.mark.parametrize("request_kwargs", [
    {"prompt_ids": []},
    {},
    {"prompt_ids": [10**7]},
    {"prompt_ids": list(range(100, 700))},  # longer than the 512-token context
])
async def test_bad_requests_are_typed_errors(scheduler, request_kwargs):
    with pytest.raises(InvalidRequestError):
        await collect(scheduler, GenerationRequest(**request_kwargs))
