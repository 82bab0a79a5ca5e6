"""Read a GGUF file: its metadata and its tensors, dequantised once to float32.

The `gguf` package supplies the format's tables and the dequantisation of every quant type
the bundled files use (Q4_1, Q8_0, Q4_K, Q5_0, Q6_K, F16, F32). Its `GGUFReader` builds
one numpy view per array element, which takes ~10 s for SmolLM2's 100k vocabulary strings
on this machine, so the header is parsed here with `struct` (well under a second) and the
tensor data is memory-mapped and handed to `gguf.quants.dequantize`.

The other thing this module adds is the layout fix for llama-arch files: llama.cpp's
converter permutes the rows of the Q and K projections so that RoPE rotates interleaved
pairs (x0, x1), (x2, x3), ...; our model applies RoPE in the Hugging Face "rotate half"
layout, pairing x[i] with x[i + d/2], so the permutation is undone here, head by head.
qwen2 files are stored unpermuted (llama.cpp uses the NEOX rotation for them).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from agent.errors import ConfigError

# Architectures whose attn_q / attn_k rows llama.cpp's converter permutes.
PERMUTED_ARCHS = frozenset({"llama"})

_SCALARS: dict[GGUFValueType, tuple[str, np.dtype]] = {
    GGUFValueType.UINT8: ("<B", np.dtype("<u1")),
    GGUFValueType.INT8: ("<b", np.dtype("<i1")),
    GGUFValueType.UINT16: ("<H", np.dtype("<u2")),
    GGUFValueType.INT16: ("<h", np.dtype("<i2")),
    GGUFValueType.UINT32: ("<I", np.dtype("<u4")),
    GGUFValueType.INT32: ("<i", np.dtype("<i4")),
    GGUFValueType.FLOAT32: ("<f", np.dtype("<f4")),
    GGUFValueType.BOOL: ("<?", np.dtype("?")),
    GGUFValueType.UINT64: ("<Q", np.dtype("<u8")),
    GGUFValueType.INT64: ("<q", np.dtype("<i8")),
    GGUFValueType.FLOAT64: ("<d", np.dtype("<f8")),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order ([out, in]); GGUF stores dims fastest-first
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file


@dataclass
class GGUFCheckpoint:
    """A parsed GGUF file. `tensors` are float32, in PyTorch [out, in] layout."""

    path: Path
    arch: str
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)  # every tensor, loaded or not

    def arch_key(self, name: str, default: Any = None) -> Any:
        """Metadata stored under the architecture's prefix, e.g. `llama.block_count`."""
        return self.metadata.get(f"{self.arch}.{name}", default)


class _Header:
    """A cursor over the header bytes of a GGUF file."""

    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item = GGUFValueType(self.scalar("<I"))
            count = self.scalar("<Q")
            if item in _SCALARS:  # numeric arrays in one read
                dtype = _SCALARS[item][1]
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            return [self.value(item) for _ in range(count)]
        return self.scalar(_SCALARS[vtype][0])


def _parse(path: Path) -> tuple[dict[str, Any], list[TensorInfo], np.memmap]:
    if not path.is_file():
        raise ConfigError(f"GGUF file not found: {path}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    head = _Header(memoryview(data.data))
    try:
        if head.scalar("<I") != 0x46554747:  # b"GGUF" little-endian
            raise ValueError("bad magic")
        version = head.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = head.scalar("<Q"), head.scalar("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = head.string()
            meta[key] = head.value(GGUFValueType(head.scalar("<I")))
        raw_infos = []
        for _ in range(n_tensors):
            name = head.string()
            dims = [head.scalar("<Q") for _ in range(head.scalar("<I"))]
            raw_infos.append((name, dims, GGMLQuantizationType(head.scalar("<I")),
                              head.scalar("<Q")))
    except (struct.error, ValueError, IndexError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from exc
    align = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    start = -(-head.pos // align) * align
    infos = [TensorInfo(name, tuple(reversed(dims)), qtype, start + off)
             for name, dims, qtype, off in raw_infos]
    return meta, infos, data


def read_header(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Every metadata key (tokenizer arrays included) and every tensor's name/shape/type."""
    meta, infos, _ = _parse(Path(path))
    return meta, infos


def read_metadata(path: str | Path) -> dict[str, Any]:
    return read_header(path)[0]


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: interleaved RoPE pairs back to rotate-half.

    Inside each head the converter moved HF row (j * d/2 + i) to GGUF row (2 * i + j).
    weight: [n_head * head_dim, ...] (a 1-D bias works too).
    """
    half = weight.shape[0] // n_head // 2
    return (weight.reshape(n_head, half, 2, *weight.shape[1:])  # [H, d/2, 2, ...]
            .transpose(1, 2)                                    # [H, 2, d/2, ...]
            .reshape(weight.shape))


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation itself (HF rotate-half rows to interleaved pairs)."""
    half = weight.shape[0] // n_head // 2
    return (weight.reshape(n_head, 2, half, *weight.shape[1:])
            .transpose(1, 2)
            .reshape(weight.shape))


def _dequantise(info: TensorInfo, data: np.memmap) -> np.ndarray:
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    n_elements = int(np.prod(info.shape))
    n_bytes = n_elements // block * type_size
    raw = data[info.offset:info.offset + n_bytes]
    if len(raw) != n_bytes:
        raise ConfigError(f"tensor {info.name} runs past the end of the file")
    if info.qtype == GGMLQuantizationType.F32:
        return np.array(raw.view(np.float32))  # a copy: the map is read-only
    rows = raw.reshape(-1, info.shape[-1] // block * type_size)  # [rows, bytes per row]
    try:
        return dequantize(rows, info.qtype).astype(np.float32, copy=False)
    except NotImplementedError as exc:
        raise ConfigError(f"tensor {info.name}: quant type {info.qtype.name} unsupported") from exc


def load_gguf(path: str | Path, *, undo_permutation: bool = True,
              skip: Callable[[str], bool] | None = None) -> GGUFCheckpoint:
    """Parse metadata and dequantise every tensor (except those `skip` names) to float32.

    `undo_permutation=False` keeps llama.cpp's Q/K row order; it exists so that a test
    can show the model answers wrongly without the fix.
    """
    path = Path(path)
    meta, infos, data = _parse(path)
    arch = str(meta.get("general.architecture", ""))
    ckpt = GGUFCheckpoint(path=path, arch=arch, metadata=meta)
    permute = undo_permutation and arch in PERMUTED_ARCHS
    n_head = int(ckpt.arch_key("attention.head_count", 1))
    n_kv_head = int(ckpt.arch_key("attention.head_count_kv", n_head))
    wanted = []
    for info in infos:
        ckpt.tensor_types[info.name] = info.qtype.name
        if skip is None or not skip(info.name):
            wanted.append(info)
    # numpy releases the GIL in the bulk of dequantisation: a few threads overlap well.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        arrays = pool.map(lambda i: _dequantise(i, data), wanted)
        for info, array in zip(wanted, arrays, strict=True):
            ckpt.tensors[info.name] = _fix_layout(info, array, permute, n_head, n_kv_head)
    return ckpt


def _fix_layout(info: TensorInfo, array: np.ndarray, permute: bool, n_head: int,
                n_kv_head: int) -> torch.Tensor:
    weight = torch.from_numpy(array.reshape(info.shape))
    if permute and info.name.endswith(("attn_q.weight", "attn_q.bias")):
        return unpermute_qk(weight, n_head).contiguous()
    if permute and info.name.endswith(("attn_k.weight", "attn_k.bias")):
        return unpermute_qk(weight, n_kv_head).contiguous()
    return weight


def read_blocks(path: str | Path, names: list[str]) -> dict[str, tuple[GGMLQuantizationType,
                                                                      np.ndarray]]:
    """The named tensors' bytes as stored, uint8 [rows, bytes per row], with their type.

    Rows are whole quant blocks along the input dimension, so llama.cpp's Q/K row
    permutation is undone on them exactly as on float rows (see `_fix_layout`).
    """
    path = Path(path)
    meta, infos, data = _parse(path)
    arch = str(meta.get("general.architecture", ""))
    by_name = {i.name: i for i in infos}
    n_head = int(meta.get(f"{arch}.attention.head_count", 1))
    n_kv_head = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    out = {}
    for name in names:
        info = by_name.get(name)
        if info is None:
            raise ConfigError(f"the GGUF file lacks tensor {name!r}")
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        n_bytes = int(np.prod(info.shape)) // block * type_size
        raw = data[info.offset:info.offset + n_bytes]
        if len(raw) != n_bytes:
            raise ConfigError(f"tensor {info.name} runs past the end of the file")
        rows = torch.from_numpy(np.array(raw).reshape(info.shape[0], -1))
        if arch in PERMUTED_ARCHS and name.endswith("attn_q.weight"):
            rows = unpermute_qk(rows, n_head)
        elif arch in PERMUTED_ARCHS and name.endswith("attn_k.weight"):
            rows = unpermute_qk(rows, n_kv_head)
        out[name] = (info.qtype, rows.contiguous().numpy())
    return out
