"""Copy the OHIF screenshots of LIDC-IDRI-0002 from the last viewer test run into ``docs/``, scaled down.

LIDC-IDRI-0002 is a real unenhanced chest CT (TCIA LIDC-IDRI, CC BY 3.0: publishing derived
images is allowed with attribution, which docs/viewer.md gives). 3D-IRCADb's licence
(CC BY-NC-ND) forbids publishing images derived from it, so its screenshots stay in
``out/viewer-screenshots/ircadb``; ``--case phantom`` takes the synthetic phantom's instead.

Usage (after ``pytest tests/viewer``, which needs ``../shared/data`` for LIDC)::

    .venv/bin/python -m tests.viewer.docs_screenshots [--case lidc|phantom]

``--keyimage PATH/keyimage.dcm`` also writes that key image's pixels, unscaled, to
``docs/keyimage-lidc.png`` (the README's picture; take it from ``liverfat analyze`` of LIDC-IDRI-0002).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pydicom
from PIL import Image

from tests.viewer.stack import REPO
from tests.viewer.test_ohif import SCREENSHOTS

logger = logging.getLogger(__name__)

DOCS = REPO / "docs"
WIDTH_PX = 1000
PALETTE_COLOURS = 256
PUBLISHABLE_CASES = ("lidc", "phantom")  # never "ircadb" (CC BY-NC-ND)
# docs name -> screenshot of the run (glob)
PICKS = {
    "ohif-seg.png": "04-seg-panel.png",
    "ohif-sr.png": "02-sr-1.png",
    "ohif-keyimage.png": "05-keyimage.png",
    "ohif-sr-summary.png": "06-report-*.png",
}


def copy_screenshots(source: Path = SCREENSHOTS / "lidc", target: Path = DOCS) -> list[Path]:
    written = []
    for name, pattern in PICKS.items():
        matches = sorted(source.glob(pattern))
        if not matches:
            logger.warning("no %s in %s: run the viewer test first", pattern, source)
            continue
        image = Image.open(matches[0]).convert("RGB")
        height = round(image.height * WIDTH_PX / image.width)
        path = target / name
        scaled = image.resize((WIDTH_PX, height), Image.Resampling.LANCZOS)
        # 256 colours keep text and overlays crisp at a third of the size (the CT noise costs the most)
        scaled.quantize(colors=PALETTE_COLOURS, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
        written.append(path)
    return written


def copy_key_image(dicom_file: Path, target: Path = DOCS / "keyimage-lidc.png") -> Path:
    """The key image's own pixels (RGB Secondary Capture) as a PNG."""
    Image.fromarray(pydicom.dcmread(dicom_file).pixel_array).save(target, optimize=True)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=PUBLISHABLE_CASES, default="lidc")
    parser.add_argument("--keyimage", type=Path, help="a keyimage.dcm of LIDC-IDRI-0002 to copy as docs/keyimage-lidc.png")
    arguments = parser.parse_args()
    for written_path in copy_screenshots(SCREENSHOTS / arguments.case):
        logger.info("wrote %s", written_path)
    if arguments.keyimage:
        logger.info("wrote %s", copy_key_image(arguments.keyimage))
