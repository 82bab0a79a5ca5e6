"""What container a byte string is, and whether its structure says it was cut short.

FFmpeg decodes whatever prefix of a file is present without complaint for several
containers (a WAV cut in half plays its first half), so a truncated upload would be
transcribed as if it were whole. The checks here read the few header fields that say how
long the file should be: the WAV data chunk size, the Ogg page walk and its end-of-stream
flag, the EBML element sizes of a WebM, the MPEG frame length of an MP3's last frame,
and whether an MP3 carries a Xing/Info/VBRI header (a declared length FFmpeg reports as
the duration). A file cut exactly between two frames cannot be told from a shorter one.
"""

from __future__ import annotations

# A data-chunk size this large (or zero) is the "length unknown" marker that streaming
# WAV writers put in the header; the audio runs to the end of the file.
_WAV_UNKNOWN_SIZE = 0x7FFFF000

_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"}

# MPEG audio bitrates in kbit/s by [version is MPEG-1][layer 1..3][index].
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def id3v2_length(data: bytes) -> int:
    """Bytes taken by a leading ID3v2 tag (0 if none)."""
    if len(data) < 10 or data[:3] != b"ID3" or any(b & 0x80 for b in data[6:10]):
        return 0
    size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
    footer = 10 if data[5] & 0x10 else 0
    return 10 + size + footer


def _is_adts(head: bytes) -> bool:
    # 12-bit sync, layer 00, a valid sampling-frequency index.
    return (len(head) >= 7 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0
            and (head[2] >> 2) & 0x0F < 13)


def mpeg_frame_length(head: bytes) -> int | None:
    """Length in bytes of the MPEG audio frame whose header starts `head`, if it is one."""
    if len(head) < 4 or head[0] != 0xFF or (head[1] & 0xE0) != 0xE0:
        return None
    version = (head[1] >> 3) & 3                       # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    layer = 4 - ((head[1] >> 1) & 3)                   # 1..3; 4 means reserved
    bitrate_index, rate_index = head[2] >> 4, (head[2] >> 2) & 3
    if version == 1 or layer == 4 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    bitrate = _BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    rate = _MPEG_RATES[version][rate_index]
    padding = (head[2] >> 1) & 1
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4
    per_frame = 144 if (layer == 2 or mpeg1) else 72   # half-size frames for MPEG-2 L3
    return per_frame * bitrate // rate + padding


def _skip_padding(data: bytes, offset: int, limit: int = 4096) -> int:
    # Some taggers pad past the size the ID3 header declares.
    end = min(len(data), offset + limit)
    while offset < end and data[offset] == 0:
        offset += 1
    return offset


def sniff(data: bytes) -> str | None:
    """The container an audio file is in (an INPUT_FORMATS name), or None if unknown."""
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RF64", b"BW64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if len(data) >= 8 and data[4:8] in _MP4_BOXES and int.from_bytes(data[:4], "big") >= 8:
        return "m4a"
    start = id3v2_length(data)
    if start:
        start = _skip_padding(data, start)
    head = data[start:start + 8]
    if head[:4] == b"fLaC":
        return "flac"
    if _is_adts(head):
        return "aac"
    if mpeg_frame_length(head) is not None:
        return "mp3"
    return None


def wav_problem(data: bytes) -> str | None:
    """Why a WAV file is unusable before decoding (no data chunk, cut short), if it is."""
    if data[:4] != b"RIFF":
        return None   # RF64/BW64 keep sizes in a ds64 chunk; FFmpeg reads those.
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            if size == 0 or size >= _WAV_UNKNOWN_SIZE or pos + 8 + size <= len(data):
                return None
            return (f"WAV file is truncated: its header announces {size} bytes of audio "
                    f"but only {len(data) - pos - 8} are present")
        pos += 8 + size + (size & 1)
    return "WAV file has no audio data chunk (it is truncated or not a WAV file)"


def ogg_problem(data: bytes) -> str | None:
    """Why an Ogg file is cut short (a partial page, or no end-of-stream page), if it is."""
    pos, seen, ended = 0, set(), set()
    while pos < len(data):
        if data[pos:pos + 4] != b"OggS":
            return None   # not a clean page walk; leave the judgement to the demuxer
        if pos + 27 > len(data) or pos + 27 + data[pos + 26] > len(data):
            return "Ogg file is truncated: its last page is incomplete"
        segments = data[pos + 27:pos + 27 + data[pos + 26]]
        end = pos + 27 + len(segments) + sum(segments)
        if end > len(data):
            return "Ogg file is truncated: its last page is incomplete"
        serial = data[pos + 14:pos + 18]
        seen.add(serial)
        if data[pos + 5] & 0x04:
            ended.add(serial)
        pos = end
    if seen - ended:
        return "Ogg file is truncated: it ends without an end-of-stream page"
    return None


# EBML masters whose children follow their header directly: Segment, Cluster, BlockGroup.
# Browsers' MediaRecorder writes Segment and Cluster with "unknown" sizes.
_EBML_DESCEND = {0x18538067, 0x1F43B675, 0xA0}
_WEBM_CUT = "WebM file is truncated: its last element is incomplete"


def _ebml_number(data: bytes, pos: int, max_length: int) -> tuple[int, int] | None:
    """(value with the length marker kept, length) of the EBML number at `pos`."""
    if pos >= len(data) or data[pos] == 0:
        return None
    length = 9 - data[pos].bit_length()
    if length > max_length or pos + length > len(data):
        return None
    return int.from_bytes(data[pos:pos + length], "big"), length


def webm_problem(data: bytes) -> str | None:
    """Why a WebM/Matroska file is cut short (an element running past the end), if it is."""
    pos = 0
    while pos < len(data):
        element = _ebml_number(data, pos, 4)
        size = _ebml_number(data, pos + element[1], 8) if element else None
        if element is None or size is None:
            # A header cut by the end of the file is truncation; anything else is the
            # demuxer's to judge.
            return _WEBM_CUT if len(data) - pos < 12 else None
        (element_id, id_length), (raw_size, size_length) = element, size
        value = raw_size & ((1 << (7 * size_length)) - 1)
        unknown = value == (1 << (7 * size_length)) - 1
        body = pos + id_length + size_length
        if not unknown and body + value > len(data):
            return _WEBM_CUT
        if element_id in _EBML_DESCEND:
            pos = body
        elif unknown:
            return None
        else:
            pos = body + value
    return None


def mp3_declares_length(data: bytes) -> bool:
    """Whether an MP3's first frame is a Xing/Info/VBRI header giving the stream length."""
    start = _skip_padding(data, id3v2_length(data))
    first = data[start:start + 64]
    return b"Xing" in first or b"Info" in first or first[36:40] == b"VBRI"


def mp3_last_frame_cut(data: bytes, pos: int, size: int) -> bool:
    """Whether the MP3 packet at `pos` (the last one demuxed) is shorter than its header says."""
    expected = mpeg_frame_length(data[pos:pos + 4])
    return expected is not None and size < expected and pos + size >= len(data)
