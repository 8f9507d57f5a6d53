"""What a radiologist sees of our SEG, SR and key image in OHIF v3, checked in a real browser.

Orthanc (DICOMweb) and OHIF run same-origin in a private network namespace; headless
Chromium, driven by ``drive_ohif.mjs``, opens the study like a reader would. The checks use
the screenshots' pixels, not only the page's DOM: the CT is drawn; each SR circle is drawn on
its slice with its HU value, where the SEG's ROI segment lies; the SEG tints the liver and the
ROIs; the key image shows its grade text. Screenshots land in ``out/viewer-screenshots/<case>/``
(or ``$LIVERFAT_VIEWER_SCREENSHOTS``) on every run.

Cases: a phantom (always); with ``../shared/data``, 3D-IRCADb-01 patient 1 with its manual mask,
and LIDC-IDRI-0002, the real unenhanced chest CT the node exists for, analysed end to end the way
``liverfat analyze`` does it (header filter, default model, quality checks, outputs): its
screenshots are the ones in ``docs/`` (``tests/viewer/docs_screenshots.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from liverfat.analysis import AnalysisOptions, Outcome
from liverfat.dicom_io.outputs import write_outputs
from liverfat.dicom_io.read import discover, load_series
from liverfat.dicom_io.seg import LIVER_RGB, roi_name, roi_rgb
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.sr import grade_sentence, summary_title
from liverfat.inference.models.registry import load_backend
from liverfat.inference.pipeline import measure_series
from liverfat.result import AnalysisResult
from liverfat.service.research import ResearchRun, analyze_inputs
from liverfat.volume import Volume
from tests.phantom import Grid, Phantom, SeriesHeader, render_volume, write_series
from tests.viewer import pixels
from tests.viewer.expected import RULER_MM, SegRoi, seg_rois, slice_probes
from tests.viewer.stack import REPO, ReadingSetup, install_viewer_tools, missing_prerequisite, reading_setup

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(os.environ.get("LIVERFAT_VIEWER_SCREENSHOTS", REPO / "out" / "viewer-screenshots"))
# 512 x 512 at 0.7 mm like a chest CT; 13 slices are enough for three ROI slices 5 mm apart
PHANTOM_GRID = Grid(rows=512, columns=512, pixel_spacing_mm=0.7, slice_positions_mm=tuple(np.arange(-15.0, 15.1, 2.5)))
PHANTOM_LIVER_HU = 15.0  # severe steatosis: a grade to show, and a liver visibly darker than the body (35 HU)
# W400/L40, the reader's soft-tissue preset; 3D-IRCADb's own (0028,1050/1051) are 0, which OHIF shows as W2/L0
SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)
POSITION_TOLERANCE_PX = 3.0
RADIUS_TOLERANCE = 0.15  # relative
HU_LABEL = re.compile(r"Attenuation Coefficient: (-?\d+(?:\.\d+)?) \[hnsf'U\]")
MIN_CT_GREY_LEVELS = 40
KEY_IMAGE_MIN_CORRELATION = 0.9
KEY_TEXT_MIN_CORRELATION = 0.6


IMAGING_MEASUREMENT_REPORT = "126000"  # the SR title OHIF draws as annotations; other titles it shows as text
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class StudyCase:
    """A CT series, its analysis, and the DICOM objects written for it, sorted by what they are."""

    name: str
    series: CTSeries
    ct_files: list[Path]
    result: AnalysisResult
    outputs: list[Path]

    def headers(self) -> list[tuple[Path, pydicom.Dataset]]:
        return [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in self.outputs]

    @property
    def seg(self) -> Path:
        (seg,) = [path for path, ds in self.headers() if ds.SOPClassUID == SEG_SOP_CLASS]
        return seg

    @property
    def keyimage(self) -> Path:
        (key,) = [path for path, ds in self.headers() if ds.Modality != "SR" and ds.SOPClassUID != SEG_SOP_CLASS]
        return key

    def reports(self) -> list[tuple[Path, pydicom.Dataset]]:
        return [(path, ds) for path, ds in self.headers() if ds.Modality == "SR"]

    @property
    def measurement_report(self) -> Path:
        """The SR with the ROI circles (title Imaging Measurement Report)."""
        (report,) = [path for path, ds in self.reports() if _title(ds) == IMAGING_MEASUREMENT_REPORT]
        return report


def _title(dataset: pydicom.Dataset) -> str:
    return str(dataset.ConceptNameCodeSequence[0].CodeValue)


def _thumbnail(dataset: pydicom.Dataset) -> str:
    """A regular expression that finds the series' thumbnail in OHIF's study browser."""
    description = str(dataset.get("SeriesDescription") or "")  # LIDC's CT series has none
    return f"{re.escape(description)}[\\s\\S]*S:{int(dataset.SeriesNumber)}(?!\\d)"


def _ct_thumbnail(dataset: pydicom.Dataset) -> str | None:
    """The CT series' thumbnail, which the driver opens (OHIF opens the lowest series number first:
    LIDC's CT is 3000522, after our 99xx); None without a series number (3D-IRCADb), which OHIF
    lists first anyway."""
    return _thumbnail(dataset) if dataset.get("SeriesNumber") not in (None, "") else None


@dataclass(frozen=True)
class Shown:
    """One study opened in OHIF: the case, what the SEG says, and the driver's report."""

    case: StudyCase
    rois: list[SegRoi]
    report: dict[str, Any]

    def step(self, name: str) -> dict[str, Any]:
        step: dict[str, Any] = self.report["steps"].get(name, {})
        assert "error" not in step, f"OHIF step {name!r} failed: {step.get('error')}\nconsole: {self.report['console']}"
        return step


def _analysed(name: str, folder: Path, liver: Volume) -> StudyCase:
    """Read the series under ``folder / 'ct'``, analyse it with ``liver`` as mask, write our outputs."""
    (files,) = discover([folder / "ct"]).series
    series = load_series(files)
    result = measure_series(series, liver, eligible=True, reasons=())
    outputs = [w.path for w in write_outputs(series, result, folder / "outputs")]
    return StudyCase(name, series, list(files.files), result, outputs)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadingSetup]:
    missing = missing_prerequisite()
    if missing:
        pytest.skip(f"OHIF viewer test not possible: {missing}")
    with reading_setup(tmp_path_factory.mktemp("reading-setup"), install_viewer_tools()) as setup:
        yield setup


def phantom_case(folder: Path) -> StudyCase:
    phantom = Phantom().with_liver_hu(PHANTOM_LIVER_HU)
    write_series(folder / "ct", phantom, PHANTOM_GRID, SeriesHeader(patient_id="PHANTOM-VIEWER"))
    _, liver = render_volume(phantom, PHANTOM_GRID)
    return _analysed("phantom", folder, liver)


def ircadb_case(shared_data: Path, folder: Path) -> StudyCase:
    """3D-IRCADb-01 patient 1 with its manual liver mask (non-zero voxels of MASKS_DICOM/liver)."""
    root = shared_data / "3dircadb-1.1"
    (folder / "ct").symlink_to(root / "PATIENT_DICOM", target_is_directory=True)
    (files,) = discover([root / "PATIENT_DICOM"]).series
    series = load_series(files)
    masks = [pydicom.dcmread(path) for path in (root / "MASKS_DICOM" / "liver").iterdir()]
    by_position = {_position(mask): mask.pixel_array != 0 for mask in masks}
    liver = np.stack([by_position[_position(ds)] for ds in series.datasets])
    return _analysed("ircadb", folder, series.volume.with_array(liver))


def lidc_case(shared_data: Path, folder: Path) -> StudyCase:
    """LIDC-IDRI-0002 (261 slices, unenhanced chest CT) through ``liverfat analyze`` with the default model on CPU."""
    root = shared_data / "chest-ct" / "lidc-idri-0002"
    run = ResearchRun(AnalysisOptions(out_dir=folder / "outputs"))
    (report,) = analyze_inputs([root], run, lambda: load_backend(device="cpu")).reports
    assert report.outcome is Outcome.PROCESSED, f"LIDC-IDRI-0002 was not processed: {report.result.reasons}"
    (files,) = discover([root]).series
    dicom_outputs = [path for path in report.outputs if path.suffix == ".dcm"]
    return StudyCase("lidc", load_series(files), list(files.files), report.result, dicom_outputs)


def _position(dataset: pydicom.Dataset) -> tuple[float, ...]:
    return tuple(round(float(v), 2) for v in dataset.ImagePositionPatient)


@pytest.fixture(scope="module", params=["phantom", "ircadb", "lidc"])
def shown(request: pytest.FixtureRequest, viewer: ReadingSetup, tmp_path_factory: pytest.TempPathFactory) -> Shown:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "phantom":
        case = phantom_case(folder)
    elif request.param == "ircadb":
        case = ircadb_case(request.getfixturevalue("shared_data"), folder)
    else:
        case = lidc_case(request.getfixturevalue("shared_data"), folder)
    viewer.store(case.ct_files)
    viewer.store(case.outputs)
    rois = seg_rois(case.seg, case.series)
    probes = slice_probes(case.seg, case.series, rois)
    slices = [{"sop": probe.sop_uid, "points": probe.points} for probe in probes]
    headers = dict(case.headers())
    key = headers[case.keyimage]
    spec = {
        "studyUid": case.series.study_uid,
        "viewport": {"width": 1400, "height": 900},
        "voi": SOFT_TISSUE_WINDOW_HU,
        "ct": {"thumbnail": _ct_thumbnail(case.series.datasets[0]), "slices": slices},
        "sr": {
            "thumbnail": _thumbnail(headers[case.measurement_report]),
            "count": len(rois),
            "slices": [{"sop": s.sop_uid, "points": s.points} for roi in rois for s in roi.slices],
        },
        "seg": {"thumbnail": _thumbnail(headers[case.seg]), "slices": slices},
        "keyimage": {"thumbnail": _thumbnail(key), "sop": str(key.SOPInstanceUID)},
        "reports": [
            {
                "thumbnail": _thumbnail(ds),
                "name": f"sr{i + 1}",
                "title": str(ds.ConceptNameCodeSequence[0].CodeMeaning),
                "expect": grade_sentence(case.result),
            }
            for i, (_, ds) in enumerate(case.reports())
            if _title(ds) != IMAGING_MEASUREMENT_REPORT
        ],
    }
    out = SCREENSHOTS / case.name
    report = viewer.drive(spec, out)
    print(f"\nOHIF screenshots of {case.name}: {out}")
    return Shown(case, rois, report)


def test_three_rois_in_the_seg(shown: Shown) -> None:
    assert [roi.label for roi in shown.rois] == [roi.label for roi in shown.case.result.rois]
    assert len(shown.rois) == 3


def test_ohif_draws_the_ct(shown: Shown) -> None:
    step = shown.step("ct")
    for slice_shown in step["slices"]:
        state = slice_shown["state"]
        assert state["hasImage"] and state["count"] == len(shown.case.series.datasets)
        image = pixels.load_rgb(slice_shown["screenshot"])
        canvas = pixels.region(image, state["canvas"])
        assert pixels.grey_levels(canvas) >= MIN_CT_GREY_LEVELS, "the viewport is (nearly) uniform: no CT drawn"
        liver = pixels.mean_rgb(image, state["projected"]["liver"])
        body = pixels.mean_rgb(image, state["projected"]["body"])
        assert np.ptp(liver) < 6 and np.ptp(body) < 6, "CT pixels should be grey before the SEG is loaded"
        assert liver.mean() > 20 and body.mean() > 20, "liver and body must be drawn in soft-tissue grey, not black"


def test_sr_circles_are_drawn_on_the_seg_rois_with_their_hu_values(shown: Shown) -> None:
    step = shown.step("sr")
    assert len(step["annotations"]) == len(shown.rois), "OHIF should draw exactly one circle per ROI"
    means = {roi.label: roi.mean_hu for roi in shown.case.result.rois}
    seen = set()
    for visit in step["visits"]:
        sop = visit["state"]["sop"]
        found = [(roi, on_slice) for roi in shown.rois if (on_slice := roi.on(sop)) is not None]
        assert len(found) == 1, f"OHIF showed a circle on slice {sop}, which holds {len(found)} ROI segments, not 1"
        ((roi, on_slice),) = found
        labels = [m for text in visit["shapes"]["texts"] for m in HU_LABEL.finditer(text)]
        assert len(labels) == 1, (
            f"ROI {roi.label}: expected one 'Attenuation Coefficient: <mean> [hnsf'U]' label, OHIF drew "
            f"{visit['shapes']['texts']} (a second HU value next to the circle reads as a second mean)"
        )
        assert abs(float(labels[0].group(1)) - means[roi.label]) <= 0.006, (
            f"ROI {roi.label}: label {labels[0].group(0)!r}, measured mean {means[roi.label]:.3f} HU"
        )
        expected = visit["projected"]["roi"]
        scale = float(np.hypot(*np.subtract(visit["projected"]["ruler"], expected))) / RULER_MM
        image = pixels.load_rgb(visit["screenshot"])
        circle = pixels.find_green_circle(image, expected, on_slice.equivalent_radius_mm * scale)
        assert circle is not None, f"no green circle drawn near the SEG's ROI {roi.label} at {expected}"
        offset = float(np.hypot(circle.centre[0] - expected[0], circle.centre[1] - expected[1]))
        assert offset <= POSITION_TOLERANCE_PX, f"ROI {roi.label}: circle {offset:.1f} px from the SEG ROI"
        radius_mm = circle.radius / scale
        assert abs(radius_mm - on_slice.equivalent_radius_mm) <= RADIUS_TOLERANCE * on_slice.equivalent_radius_mm
        seen.add(roi.label)
    assert seen == {roi.label for roi in shown.rois}, "OHIF's measurement arrows should visit every ROI"


def test_seg_tints_the_liver_and_each_roi(shown: Shown) -> None:
    ct_slices = shown.step("ct")["slices"]
    step = shown.step("seg")
    labels = {segment["label"] for s in step["segmentations"] for segment in s["segments"]}
    assert {"Liver", *(f"Liver {roi_name(roi)}" for roi in shown.case.result.rois)} <= labels
    for roi, before, after in zip(shown.rois, ct_slices, step["slices"], strict=True):
        assert after["state"]["sop"] == roi.primary.sop_uid
        ct_image = pixels.load_rgb(before["screenshot"])
        seg_image = pixels.load_rgb(after["screenshot"])
        points = after["state"]["projected"]
        assert pixels.tints_towards(pixels.overlay_shift(ct_image, seg_image, points["liver"]), LIVER_RGB), (
            f"liver not tinted on ROI {roi.label}'s slice"
        )
        assert pixels.tints_towards(pixels.overlay_shift(ct_image, seg_image, points["roi"]), roi_rgb(roi.label)), (
            f"ROI {roi.label} segment not drawn in its colour"
        )
        body_shift = pixels.overlay_shift(ct_image, seg_image, points["body"])
        assert np.abs(body_shift).max() < 6, f"the body outside the liver changed colour: {body_shift}"


def test_key_image_shows_the_grade_text(shown: Shown) -> None:
    step = shown.step("keyimage")
    key = pydicom.dcmread(shown.case.keyimage).pixel_array.astype(float)
    state = step["state"]
    corners = state["imageCorners"]
    image = pixels.load_rgb(step["screenshot"])
    drawn = pixels.displayed(image, corners["topLeft"], corners["bottomRight"], key.shape[:2])
    assert pixels.correlation(drawn, key) >= KEY_IMAGE_MIN_CORRELATION
    source = shown.case.series.datasets[0]
    slice_rows = int(source.Rows) * (key.shape[1] // int(source.Columns))  # the slice is enlarged by an integer
    text_panel = np.s_[slice_rows:, :]
    assert key[text_panel].max() > 200, "the key image has no text panel below the slice"
    assert pixels.correlation(drawn[text_panel], key[text_panel]) >= KEY_TEXT_MIN_CORRELATION, (
        "the key image's text panel (grade sentence) is not drawn legibly"
    )


def test_summary_report_shows_grade_and_dl_parenchymal_as_text(shown: Shown) -> None:
    """OHIF draws no CODE or TEXT items of a measurement report; a report it renders as text must carry them."""
    reports = shown.step("reports")["shown"]
    sentence = grade_sentence(shown.case.result)
    assert any(sentence in report["text"] for report in reports), (
        f"grade sentence {sentence!r} is in no SR that OHIF shows as text; shown: {[r['text'] for r in reports]}"
    )
    assert any(report["visible"] for report in reports), (
        f"grade sentence {sentence!r} is below the fold of OHIF's SR text view: put the grade first"
    )


def test_summary_report_opens_on_the_grade_and_shows_no_image_line_before_the_sentence(shown: Shown) -> None:
    """The title, which names the outcome, is the text view's first line (TID 1500 puts the language and the device
    observer with its UID before any measurement group, so only the title can precede them); no
    "[IMAGE is not supported]" line (an Image Library entry) comes before the grade sentence."""
    sentence = grade_sentence(shown.case.result)
    (report,) = [report for report in shown.step("reports")["shown"] if sentence in report["text"]]
    first_line = report["text"].strip().splitlines()[0]
    assert first_line.endswith(summary_title(shown.case.result).meaning), first_line
    before = report["text"][: report["text"].index(sentence)]
    assert "is not supported]" not in before, before
