"""`parley serve`: run the application under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from agent.config import Settings
from agent.front.app import create_app


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, ws="auto")
