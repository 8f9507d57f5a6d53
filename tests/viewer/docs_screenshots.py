"""Copy the phantom's OHIF screenshots from the last viewer test run into ``docs/``, scaled down.

Only the synthetic phantom: 3D-IRCADb's licence (CC BY-NC-ND) forbids publishing images derived
from it, so its screenshots stay in ``out/viewer-screenshots/ircadb``.

Usage (after ``pytest tests/viewer``)::

    .venv/bin/python -m tests.viewer.docs_screenshots
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from tests.viewer.stack import REPO
from tests.viewer.test_ohif import SCREENSHOTS

logger = logging.getLogger(__name__)

DOCS = REPO / "docs"
WIDTH_PX = 1000
PALETTE_COLOURS = 256
# docs name -> screenshot of the phantom run (glob)
PICKS = {
    "ohif-seg.png": "04-seg-panel.png",
    "ohif-sr.png": "02-sr-1.png",
    "ohif-keyimage.png": "05-keyimage.png",
    "ohif-sr-summary.png": "06-report-*.png",
}


def copy_screenshots(source: Path = SCREENSHOTS / "phantom", target: Path = DOCS) -> list[Path]:
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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for written_path in copy_screenshots():
        logger.info("wrote %s", written_path)
