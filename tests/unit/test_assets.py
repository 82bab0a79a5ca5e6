"""The bundled models: located in their packages, assembled, verified, clear when missing."""

from pathlib import Path

import pytest

from agent.assets import MODELS, ModelSpec, Part, prepare, resolve, sha256_file, status
from agent.errors import ModelMissingError


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if not s.optional])
def test_default_models_resolve_and_match_their_checksums(settings, name):
    path = resolve(name, settings.cache_dir)
    spec = MODELS[name]
    main = path / spec.main_file if path.is_dir() else path
    assert main.stat().st_size == spec.size
    assert status(spec, settings.cache_dir).checksum == "ok"


def test_whisper_is_assembled_with_its_json_files(settings):
    folder = resolve("whisper-base", settings.cache_dir)
    assert {"model.bin", "config.json", "tokenizer.json", "vocabulary.json"} <= {
        p.name for p in folder.iterdir()}


def test_assembly_into_a_fresh_cache_reports_progress(tmp_path: Path):
    seen: list[int] = []
    spec = MODELS["whisper-base"]
    path = prepare(spec, tmp_path, lambda total, desc: seen.append)
    assert path == tmp_path / "models" / "whisper-base" / "model.bin"
    assert sum(seen) >= spec.size  # assembly plus the checksum pass
    assert sha256_file(path) == spec.sha256
    assert status(spec, tmp_path).checksum == "ok"  # stamped: no re-hash next start


def test_a_corrupted_assembly_is_detected_and_rebuilt(tmp_path: Path):
    spec = MODELS["whisper-base"]
    path = prepare(spec, tmp_path)
    with open(path, "r+b") as fh:  # flip bytes, keep the size
        fh.seek(1000)
        fh.write(b"\0\0\0\0")
    path.with_name("model.bin.verified").unlink()
    assert status(spec, tmp_path, verify=True).checksum == "mismatch"
    path.unlink()
    assert sha256_file(prepare(spec, tmp_path)) == spec.sha256


def test_missing_package_gives_one_line_error_naming_it(tmp_path: Path):
    ghost = ModelSpec(name="ghost", role="llm", description="", main_file="g.gguf",
                      parts=(Part("parley-no-such-package", "x/g.gguf"),), sha256="0", size=1)
    with pytest.raises(ModelMissingError) as info:
        prepare(ghost, tmp_path)
    assert "pip install parley-no-such-package" in info.value.message
    assert "\n" not in info.value.message


def test_unknown_model_name():
    with pytest.raises(ModelMissingError, match="known models"):
        resolve("gpt-5", Path("/tmp"))
