"""The engines a running server shares: ASR, TTS, one decoder scheduler per LLM, the store.

Engines load lazily, off the event loop, once: the first request that needs the LLM pays
its load (seconds), later ones share it. `warm()` loads everything at start-up instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agent.config import Settings
from agent.state.store import Store

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self._asr: Any = None
        self._tts: Any = None
        self._vad: Any = None
        self._schedulers: dict[str, Any] = {}
        self._dispatcher: Any = None
        self.tools_config: Any = None
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def asr(self) -> Any:
        async with self._lock("asr"):
            if self._asr is None:
                from agent.speech.asr import ASREngine

                self._asr = await asyncio.to_thread(ASREngine, self.settings)
        return self._asr

    async def tts(self) -> Any:
        async with self._lock("tts"):
            if self._tts is None:
                from agent.speech.tts import TTSEngine

                engine = TTSEngine(self.settings)
                await asyncio.to_thread(engine.load)
                self._tts = engine
        return self._tts

    async def vad(self) -> Any:
        """The Silero VAD model (sessions keep their own stream state around it)."""
        async with self._lock("vad"):
            if self._vad is None:
                from agent.audio.vad import SileroVad

                self._vad = await asyncio.to_thread(SileroVad.from_settings, self.settings)
        return self._vad

    async def scheduler(self, model: str) -> Any:
        """The scheduler of LLM `model` (a bundled name or a .gguf path)."""
        async with self._lock(f"llm:{model}"):
            if model not in self._schedulers:
                from agent.decoder.engine import load_engine
                from agent.decoder.scheduler import Scheduler

                engine = await asyncio.to_thread(load_engine, model, settings=self.settings,
                                                 backend=self.settings.llm_backend,
                                                 progress=False)
                self._schedulers[model] = Scheduler(engine, max_streams=self.settings.llm_streams)
                log.info("loaded %s (%s backend) in %.1f s", model, engine.backend,
                         engine.load_seconds)
        return self._schedulers[model]

    async def dispatcher(self) -> Any:
        """The tool dispatcher (agent.dispatch), opened on first use from the tools config."""
        async with self._lock("tools"):
            if self._dispatcher is None:
                from agent.dispatch.catalog import open_dispatcher
                from agent.dispatch.config import load_tools_config

                self.tools_config = await asyncio.to_thread(load_tools_config, self.settings)
                self._dispatcher = await open_dispatcher(self.settings, self.store,
                                                         self.tools_config)
        return self._dispatcher

    def decoder_stats(self) -> dict[str, Any]:
        """Per loaded LLM: backend and weights format, sessions, streams waiting/prefilling/
        decoding, cache sizes."""
        return {name: scheduler.stats() for name, scheduler in self._schedulers.items()}

    async def warm(self) -> None:
        await asyncio.gather(self.asr(), self.tts(), self.scheduler(self.settings.llm_model))

    async def close(self) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.aclose()
        for scheduler in self._schedulers.values():
            scheduler.close()
        if self._tts is not None:
            self._tts.close()
        if self._asr is not None:
            self._asr.close()
