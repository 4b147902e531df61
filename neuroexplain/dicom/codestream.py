"""The image size a compressed frame declares in its own codestream header, read before the frame is decoded.

A codec allocates what its codestream says, not what the DICOM header says: a few hundred bytes of JPEG-LS can
declare 65535 x 65535 pixels. Comparing the codestream's size with Rows x Columns before decoding keeps every
allocation within the limits already checked on the DICOM header. Only the marker segments are read (JPEG SOF /
JPEG-LS SOF55, JPEG 2000 SIZ); decoding stays with pydicom's plugins.
"""

from __future__ import annotations

import struct

_JPEG = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
})
_J2K = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
})
# Start-of-frame markers: baseline/extended/progressive/lossless (Huffman and arithmetic), and JPEG-LS SOF55.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_SCAN_LIMIT = 1 << 16  # the frame header comes first; never scan further than this for it


def checks(syntax: str) -> bool:
    """Whether :func:`declared_size` understands this transfer syntax's codestreams."""
    return syntax in _JPEG or syntax in _J2K


def declared_size(frame: bytes, syntax: str) -> tuple[int, int] | None:
    """``(rows, columns)`` that a compressed frame declares, or ``None`` if no frame header is found.

    Args:
        frame: one frame's codestream (from the encapsulated pixel data).
        syntax: the transfer syntax UID (see :func:`checks`).

    Returns:
        ``(rows, columns)``, or ``None`` for a codestream without a readable frame header.
    """
    try:
        if syntax in _JPEG:
            return _jpeg(frame)
        if syntax in _J2K:
            return _j2k(frame)
    except struct.error:
        return None
    return None


def _jpeg(src: bytes) -> tuple[int, int] | None:
    if src[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 4 <= min(len(src), _SCAN_LIMIT):
        if src[offset] != 0xFF:
            return None
        marker = src[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        (length,) = struct.unpack_from(">H", src, offset + 2)
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", src, offset + 5)
            return int(height), int(width)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        offset += 2 + length
    return None


def _j2k(src: bytes) -> tuple[int, int] | None:
    offset = 0
    if src[:8] == b"\x00\x00\x00\x0c\x6a\x50\x20\x20":  # JP2 file: find the contiguous codestream box
        while offset + 8 <= min(len(src), _SCAN_LIMIT):
            (length,) = struct.unpack_from(">I", src, offset)
            if src[offset + 4 : offset + 8] == b"jp2c":
                offset += 8
                break
            if length < 8:
                return None
            offset += length
        else:
            return None
    if src[offset : offset + 4] != b"\xff\x4f\xff\x51":  # SOC then SIZ
        return None
    # SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4)
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", src, offset + 8)
    return int(ysiz - yosiz), int(xsiz - xosiz)
