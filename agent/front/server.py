"""`parley serve`: run the application under uvicorn, draining on SIGTERM.

uvicorn on its own stops at SIGTERM within a moment: WebSockets are closed mid-answer.
`DrainingServer` runs the drain first (agent.front.lifecycle) and only then lets uvicorn
shut down; a second signal, or SIGINT, stops at once as uvicorn always does.
"""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

import uvicorn

from agent.config import Settings
from agent.front.app import create_app
from agent.lifecycle import Lifecycle
from agent.logs import configure as configure_logging


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace_s: float):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future[None] | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._drain is not None or self._loop is None:
            super().handle_exit(sig, frame)
            return
        # A signal handler runs between two bytecodes of the loop's thread: hand over.
        self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None:
            return
        self._drain = asyncio.ensure_future(self.lifecycle.drain(self.grace_s))
        self._drain.add_done_callback(lambda _: super(DrainingServer, self).handle_exit(
            sig, frame))


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    # log_config=None: uvicorn's loggers go through the handler configured above.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level, ws="auto",
                            timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.lifecycle, settings.shutdown_grace_s).run()
