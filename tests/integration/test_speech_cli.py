"""`parley say` and `parley transcribe` as a user runs them: real processes, real files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.speech_text import word_error_rate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PARLEY = ROOT / ".venv" / "bin" / "parley"
TEXT = "The museum opens at nine in the morning and closes at six in the evening."
MAX_WER = 0.1  # at most one word in ten; clean synthetic speech is usually exact


def parley(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = str(PARLEY) if PARLEY.exists() else shutil.which("parley")
    assert exe, "the parley command is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("say")
    done = parley("say", TEXT, "--voice", "coral", "--speed", "1.25", "-o", "out.mp3",
                  cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "out.mp3"


def test_say_writes_an_mp3_named_by_its_extension(spoken: Path):
    head = spoken.read_bytes()[:3]
    assert head == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def test_transcribe_prints_the_words_that_were_said(spoken: Path):
    done = parley("transcribe", spoken.name, "--words", cwd=spoken.parent)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert word_error_rate(TEXT, lines[0]) <= MAX_WER, lines[0]
    # --words: one "start end word" line per word, in order, within the clip.
    timed = [re.match(r"^\s*(\d+\.\d+)\s+(\d+\.\d+)\s+(\S.*)$", line) for line in lines[1:]]
    assert timed and all(timed), done.stdout
    starts = [float(m.group(1)) for m in timed if m]
    ends = [float(m.group(2)) for m in timed if m]
    assert starts == sorted(starts) and all(e >= s for s, e in zip(starts, ends, strict=True))
    assert ends[-1] < 8.0
    said = " ".join(m.group(3) for m in timed if m)
    assert word_error_rate(TEXT, said) <= MAX_WER


def test_say_errors_are_one_line_with_a_nonzero_exit(tmp_path: Path):
    for args, expected in (
        (("say", "Hello there.", "--voice", "nobody", "-o", "x.wav"), "unknown voice"),
        (("say", "Hello there.", "--speed", "5", "-o", "x.wav"), "speed"),
        (("say", "Hello there.", "--format", "xyz", "-o", "x.wav"), "format"),
    ):
        done = parley(*args, cwd=tmp_path)
        assert done.returncode == 2
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.wav").exists()


def test_transcribe_errors_are_one_line_with_a_nonzero_exit(tmp_path: Path):
    (tmp_path / "notes.mp3").write_text("this is not audio at all " * 20)
    for name in ("missing.wav", "notes.mp3"):
        done = parley("transcribe", name, cwd=tmp_path)
        assert done.returncode == 2, done.stdout
        assert done.stderr.startswith("parley: ") and len(done.stderr.strip().splitlines()) == 1
