"""`parley bench speech`: ASR and TTS numbers in one Markdown table for the README.

Each part returns rows {metric, value, unit, target}; a target is a number (an upper
bound in the row's unit), a string such as "≤ 150" or "≥ 0.9", or None (informative).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
from importlib import metadata

from agent.config import Settings
from agent.errors import ParleyError

_PACKAGES = ("parley", "faster-whisper", "ctranslate2", "piper-tts", "onnxruntime", "av",
             "numpy")
_BOUND = re.compile(r"^\s*(≤|<=|<|≥|>=|>)\s*([-+0-9.eE]+)\s*(.*)$")


def bench_speech(settings: Settings, args: argparse.Namespace) -> int:
    quick = bool(getattr(args, "quick", False))
    rows: list[dict] = []
    notes: list[str] = []
    failed = False
    try:
        from agent.bench.asr import bench_asr
    except ImportError as exc:
        notes.append(f"ASR rows missing: the ASR benchmark is not available ({exc}).")
    else:
        failed |= _collect("ASR", lambda: bench_asr(settings, quick), rows, notes)
    from agent.bench.tts import bench_tts

    failed |= _collect("TTS", lambda: bench_tts(settings, quick), rows, notes)
    print(render(rows, notes, settings, quick))
    return 1 if failed else 0


def _collect(part: str, run, rows: list[dict], notes: list[str]) -> bool:
    """Run one part; a missing model or similar becomes a note, not a lost table."""
    try:
        rows.extend(run())
        return False
    except ParleyError as exc:
        notes.append(f"{part} rows missing: {exc.message}")
        return True


def render(rows: list[dict], notes: list[str], settings: Settings, quick: bool) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {_machine()}, "
        f"ASR threads {settings.asr_threads}, TTS threads {settings.tts_threads}"
        f"{', --quick' if quick else ''}.",
        f"Versions: {_versions()}.",
        "",
        "| metric | value | target | met |",
        "|---|---:|---:|:---:|",
    ]
    for row in rows:
        unit = row.get("unit") or ""
        target = _target_text(row.get("target"), unit)
        value = f"{_number(row['value'])} {unit}".strip()
        lines.append(f"| {row['metric']} | {value} | {target} | "
                     f"{_met(row['value'], row.get('target'))} |")
    lines.extend(f"\n{note}" for note in notes)
    return "\n".join(lines)


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _target_text(target: object, unit: str) -> str:
    if target is None:
        return "—"
    if isinstance(target, int | float):
        return f"≤ {_number(target)} {unit}".rstrip()
    text = str(target)
    match = _BOUND.match(text)
    if match and not match.group(3) and unit:
        return f"{text.strip()} {unit}"
    return text


def _met(value: object, target: object) -> str:
    """✓ or ✗ when the target is a bound we can read; blank otherwise."""
    if target is None or not isinstance(value, int | float):
        return ""
    if isinstance(target, int | float):
        return "✓" if value <= target else "✗"
    match = _BOUND.match(str(target))
    if not match:
        return ""
    op, bound = match.group(1), float(match.group(2))
    ok = {"≤": value <= bound, "<=": value <= bound, "<": value < bound,
          "≥": value >= bound, ">=": value >= bound, ">": value > bound}[op]
    return "✓" if ok else "✗"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def _versions() -> str:
    found = [f"Python {platform.python_version()}"]
    for name in _PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)
