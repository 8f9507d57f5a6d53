"""Render the key image of a phantom case to a PNG, so people see what radiologists get.

The phantom (``tests/phantom.py``) is written as a real CT series, three circles are
placed the way the DL-parenchymal method places them (21 mm medial of the liver's
lateral edge, on the largest liver slice and two slices either side), and
``write_outputs`` writes SEG, SR and key image; the key image's pixels become the PNG.

Run from the repository root::

    .venv/bin/python bench/render_keyimage.py [--out docs/keyimage-phantom.png] [--liver-hu 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pydicom
from PIL import Image

# Run as a script, Python puts bench/ on sys.path; the phantom and the case builder live in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liverfat.dicom_io.outputs import KEY_IMAGE_FILE, write_outputs  # noqa: E402
from tests.dicom_io.output_cases import make_result, phantom_series  # noqa: E402
from tests.phantom import Grid  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/keyimage-phantom.png"))
    parser.add_argument("--liver-hu", type=float, default=32.0, help="liver attenuation of the phantom (HU)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        series, liver = phantom_series(Path(folder) / "ct", liver_hu=args.liver_hu, grid=Grid())
        result = make_result(series, liver)
        write_outputs(series, result, Path(folder) / "out", created_at=datetime(2024, 1, 2, 10, 15))
        key_image = pydicom.dcmread(Path(folder) / "out" / KEY_IMAGE_FILE)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(key_image.pixel_array).save(args.out, optimize=True)
    print(f"{args.out}: {key_image.Columns}x{key_image.Rows}, grade {result.grade.value}, "
          f"DL-parenchymal {result.parenchymal_hu:.1f} HU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
