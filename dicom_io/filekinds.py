"""What a file that is not DICOM is, by its first bytes: so a user reads "a PNG image", not only "not DICOM"."""

from __future__ import annotations

from pathlib import Path

# signatures at offset 0; the first match names the file
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip file"),
)
_SNIFF_BYTES = 512


def file_kind(path: Path) -> str | None:
    """A few words for a known non-DICOM format (``"a PNG image"``, ``"a text file"``), or None."""
    try:
        with path.open("rb") as file:
            head = file.read(_SNIFF_BYTES)
    except OSError:
        return None
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None  # a multi-byte character cut at the end would land here too: no claim then
    return "a text file" if all(c.isprintable() or c.isspace() for c in text) else None
