"""The two TID 1500 reports (Comprehensive 3D SR) of one liverfat result: circles and summary.

Circle SR (``build_circle_sr``, ``sr.dcm``), title DCM 126000 "Imaging Measurement Report"::

    Imaging Measurement Report
      Language, observation context (device observer = this node), procedure reported
      Image Library (the CT slices the circles lie on)
      Imaging Measurements
        Measurement Group "liverfat liver ROI n"   (TID 1410, one per circle)
          tracking identifier + UID (the same as the ROI's SEG segment)
          CIRCLE image region on its source CT slice
          algorithm identification (TID 4019)
          Attenuation Coefficient [hnsf'U], derivation Mean, finding site Liver
            HAS PROPERTIES Standard Deviation [hnsf'U]   (TID 310/311 statistical property)
          Area [mm2], finding site Liver

Summary SR (``build_summary_sr``, ``sr-summary.dcm``), titled by its outcome (``summary_title``),
e.g. 99LIVERFAT SUMMARY-MODSEV "Liver attenuation: moderate-to-severe steatosis"::

    Liver attenuation: moderate-to-severe steatosis   (or "... not shown", "... not graded")
      Language, observation context, procedure reported
      Imaging Measurements
        Measurement Group "liverfat steatosis"      (TID 1501; first, so a text view opens on the grade)
          finding Steatosis of liver, finding site Liver, algorithm (grading, threshold, margin)
          Attenuation Coefficient, Mean, method DL-parenchymal: the graded value; when replaced
            ROIs make it differ, method "DL-parenchymal with replaced ROIs" and then the seed-exact
            DL-parenchymal (when measured); DL-axial
          Threshold Attenuation Coefficient [hnsf'U]
          Moderate-to-severe hepatic steatosis: Present / Not detected / Undetermined
          Certainty of Finding: Equivocal              (only when the graded value is borderline)
          TEXT Summary: the grade in words; TEXT Comment: the site's disclaimer, then the
            grade's basis (when replaced ROIs changed the value), each reason when withheld,
            each warning
        Measurement Group "liverfat liver"          (TID 1411, when a SEG was written)
          Referenced Segment: SEG segment 1 (liver), source series (not every slice)
          Attenuation Coefficient, Mean, method DL-volumetric; Volume [ml]

Both documents are machine results that no one has signed: (0040,A496) Preliminary Flag
PRELIMINARY (highdicom's ``is_final=False``; SR Document General Module, PS3.3 C.17.2:
the content is not final, which holds until a radiologist has reviewed it), Verification
Flag UNVERIFIED (no Verifying Observer), Completion Flag COMPLETE (nothing more will be
added to this instance).

Why two documents, and why these encodings (OHIF v3.13, ``extensions/cornerstone-dicom-sr``):

- OHIF treats a document titled 126000 as a measurement report: it draws every group
  that has an image region, keyed by the Tracking Unique Identifier, and labels it with
  the group's NUM items as "CodeMeaning: value unit". A 126000 group *without* an image
  region makes it crash (``Cannot read properties of undefined (reading
  'ReferencedSOPSequence')``), so the circle SR holds the three ROI groups and nothing else.
  Circles are CIRCLE SCOORDs on the source slice, in (column, row) image coordinates
  where (0.5, 0.5) is the centre of the first pixel (PS3.3 C.18.6, SCOORD).
- The SD is a property of the mean (TID 300 row "Measurement Properties", TID 311), not a
  second "Attenuation Coefficient" NUM: OHIF labelled such a NUM as a second
  "Attenuation Coefficient", which a reader takes for a second mean. OHIF now shows
  ``Attenuation Coefficient: <mean> [hnsf'U]`` and ``Area`` per circle.
- The ROI groups carry no group-level finding site; finding site Liver is on each NUM.
- OHIF shows no CODE or TEXT item of a 126000 report, and renders any other title as a
  plain text page of the content tree. The summary SR therefore has another title and
  carries the grade in words (the Summary TEXT), so a radiologist reads it in OHIF; the
  grade group comes first so that sentence is on screen without scrolling, and the liver
  group cites the source *series* (``SourceSeriesForSegmentation``) instead of every slice,
  which OHIF would print as one "[IMAGE is not supported]" line per slice.
- The summary's title: TID 1500 row 1 takes its title from DCID 7021 "Measurement Report
  Document Title", an *extensible* context group, so a title outside its four DCM codes is
  conformant; 126000 (its only general title) is what makes OHIF hide text, and the LOINC
  titles of CID 7000 name a physician's diagnostic report. The title is therefore our own, and
  it names the outcome (see ``codes.py``): TID 1500's order is significant, and it puts the
  language, the observer context (the device's UID) and the procedure before any measurement
  group, so the title is the one place before them where the grade can stand; OHIF's text view
  opens on it. The summary has no Image Library (optional, TID 1500 row 5): none of its items
  cites a slice, and OHIF printed one "[IMAGE is not supported]" per library entry above the
  grade group. The document stays a TID 1500
  Measurement Report (built by highdicom's ``MeasurementReport``, read back by
  ``hd.sr.srread`` as one), so every TID 1500 reader still finds the measurements by their
  codes; only OHIF's display depends on the title.
- The grade group cites no source images of its own (the evidence sequence lists the
  series): OHIF prints each as "[IMAGE is not supported]" ahead of the Summary sentence.
- Replaced ROIs keep their number and say so in their tracking identifier, e.g.
  "liverfat liver ROI 2 (next slice)" (the same text as the SEG segment's).
- OHIF reads the Image Library of a 126000 report unconditionally, so the circle SR
  always has one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from liverfat.dicom_io import codes
from liverfat.dicom_io.seg import (
    LIVER_SEGMENT,
    LIVER_TRACKING_ID,
    ROI_ALGORITHM_NAME,
    roi_name,
    roi_tracking_id,
    roi_tracking_label,
)
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.uids import OutputUids, creation_kwargs, derived_uid, stamp_instance_creation
from liverfat.result import USER_MASK, AnalysisResult, Grade, RoiMeasurement, RoiRule

if TYPE_CHECKING:
    from liverfat.dicom_io.site import OutputSettings

logger = logging.getLogger(__name__)

CIRCLE_SR_ROLE = "sr"
SUMMARY_SR_ROLE = "sr-summary"
CIRCLE_SERIES_DESCRIPTION = "liverfat ROI measurements"
SUMMARY_SERIES_DESCRIPTION = "liverfat steatosis summary"
GRADE_TRACKING_ID = "liverfat steatosis"
GRADING_ALGORITHM_NAME = "liverfat DL-parenchymal grading"

_GRADE_VALUE = {
    Grade.MODERATE_TO_SEVERE: codes.PRESENT,
    Grade.NONE_OR_MILD: codes.NOT_DETECTED,
    Grade.NOT_GRADED: codes.UNDETERMINED,
}
_SUMMARY_TITLE = {
    Grade.MODERATE_TO_SEVERE: codes.SUMMARY_MODERATE_TO_SEVERE,
    Grade.NONE_OR_MILD: codes.SUMMARY_NOT_SHOWN,
    Grade.NOT_GRADED: codes.SUMMARY_NOT_GRADED,
}
# "(0018,0050)", and the ", see (0018,0050)" the eligibility messages end with
_TAG = r"\([0-9A-Fa-f]{4},\s?[0-9A-Fa-f]{4}\)"
_SEE_TAGS = re.compile(rf"[,;]?\s*see {_TAG}(?:,\s*{_TAG})*")
_TAGS = re.compile(rf"\s*{_TAG}(?:,\s*{_TAG})*")
# far above the rounding error of a plane distance, far below any slice spacing
_NEAREST_MARGIN_MM = 0.01

_Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


@dataclass(frozen=True)
class CirclePlacement:
    """A circle on one source slice, in that slice's image coordinates."""

    slice_index: int  # index into CTSeries.datasets
    centre: tuple[float, float]  # (column, row); (0.5, 0.5) is the centre of the first pixel
    radius_px: float  # along the row direction (increasing column)
    off_plane_mm: float  # signed distance of the 3-D centre from the slice plane

    @property
    def graphic_data(self) -> np.ndarray:
        """CIRCLE graphic data: the centre and one point on the perimeter."""
        column, row = self.centre
        return np.array([[column, row], [column + self.radius_px, row]], dtype=np.float64)


def place_circle(
    datasets: tuple[Dataset, ...],
    centre_lps: tuple[float, float, float],
    radius_mm: float,
    slice_index: int | None = None,
) -> CirclePlacement:
    """Where a circle of ``radius_mm`` around ``centre_lps`` lies on a source slice.

    With ``slice_index`` None the slice whose plane is nearest to the centre is chosen
    (the first of equals); otherwise the centre is projected onto that slice.
    """
    candidates = _nearest_planes(_Planes.of(datasets), centre_lps) if slice_index is None else [slice_index]
    return _projected(datasets, centre_lps, radius_mm, candidates)


def place_circles(datasets: tuple[Dataset, ...], rois: Sequence[RoiMeasurement]) -> list[CirclePlacement]:
    """``place_circle`` for each ROI on its nearest slice, reading the series' geometry once."""
    planes = _Planes.of(datasets)
    return [
        _projected(datasets, roi.centre_lps, roi.radius_mm, _nearest_planes(planes, roi.centre_lps)) for roi in rois
    ]


def _projected(
    datasets: tuple[Dataset, ...], centre_lps: tuple[float, float, float], radius_mm: float, candidates: list[int]
) -> CirclePlacement:
    """The circle on the candidate slice nearest to its centre (the first of equals), by highdicom's transformer."""
    transformed = []
    for k in candidates:
        dataset = datasets[k]
        transformer = hd.spatial.ReferenceToImageTransformer(
            image_position=[float(v) for v in dataset.ImagePositionPatient],
            image_orientation=[float(v) for v in dataset.ImageOrientationPatient],
            pixel_spacing=[float(v) for v in dataset.PixelSpacing],
        )
        column, row, off_plane = transformer(np.asarray([centre_lps], dtype=np.float64))[0]
        transformed.append((abs(off_plane), k, float(column), float(row), float(off_plane)))
    _, k, column, row, off_plane = min(transformed)
    column_spacing = float(datasets[k].PixelSpacing[1])
    return CirclePlacement(k, (column, row), radius_mm / column_spacing, off_plane)


@dataclass(frozen=True)
class _Planes:
    """The slice planes of a series: each slice's position and dual normal ``n / |n|^2``, ``n`` = row x column.

    A point's distance along the dual normal is what highdicom's transformer (its inverse affine)
    gives as the off-plane coordinate, only rounded differently.
    """

    positions: np.ndarray  # (slices, 3)
    dual_normals: np.ndarray  # (slices, 3)

    @classmethod
    def of(cls, datasets: tuple[Dataset, ...]) -> _Planes:
        geometry = np.array(
            [[float(v) for v in (*ds.ImagePositionPatient, *ds.ImageOrientationPatient)] for ds in datasets],
            dtype=np.float64,
        )
        normals = np.cross(geometry[:, 3:6], geometry[:, 6:9])
        return cls(geometry[:, :3], normals / np.einsum("ij,ij->i", normals, normals)[:, np.newaxis])


def _nearest_planes(planes: _Planes, centre_lps: tuple[float, float, float]) -> list[int]:
    """The slices whose plane lies within ``_NEAREST_MARGIN_MM`` of the nearest one to ``centre_lps``.

    One matrix product for the whole series instead of a highdicom transformer per slice
    (about 0.1 ms each: 30 ms for 300 slices, and a write placed circles seven times); the
    transformer then decides among these few candidates (``_projected``), so the slice chosen
    is the one a transformer per slice would choose, ties included.
    """
    offsets = np.asarray(centre_lps, dtype=np.float64) - planes.positions
    distances = np.abs(np.einsum("ij,ij->i", planes.dual_normals, offsets))
    return [int(k) for k in np.flatnonzero(distances <= distances.min() + _NEAREST_MARGIN_MM)]


def _hu(
    name: hd.sr.CodedConcept,
    value: float,
    *,
    derivation: hd.sr.CodedConcept | None = None,
    method: hd.sr.CodedConcept | None = None,
    properties: hd.sr.MeasurementProperties | None = None,
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name,
        value=round(float(value), 2),
        unit=codes.HOUNSFIELD_UNIT,
        derivation=derivation,
        method=method,
        finding_sites=[hd.sr.FindingSite(codes.LIVER)],
        properties=properties,
    )


def _quantity(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name, value=round(float(value), 1), unit=unit, finding_sites=[hd.sr.FindingSite(codes.LIVER)]
    )


def _mean_with_sd(mean_hu: float, sd_hu: float) -> hd.sr.Measurement:
    """Mean attenuation whose standard deviation is a statistical property of it (TID 311)."""
    sd = hd.sr.NumContentItem(
        name=codes.STANDARD_DEVIATION,
        value=round(float(sd_hu), 2),
        unit=codes.HOUNSFIELD_UNIT,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )
    statistics = hd.sr.MeasurementStatisticalProperties(values=[sd])
    return _hu(
        codes.ATTENUATION_COEFFICIENT,
        mean_hu,
        derivation=codes.MEAN,
        properties=hd.sr.MeasurementProperties(measurement_statistical_properties=statistics),
    )


def _roi_group(
    series: CTSeries,
    roi: RoiMeasurement,
    circle: CirclePlacement,
    uids: OutputUids,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=circle.graphic_data,
        source_image=hd.sr.SourceImageForRegion.from_source_image(series.datasets[circle.slice_index]),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=roi_tracking_label(roi), uid=uids.tracking(roi_tracking_id(roi.label))
        ),
        referenced_region=region,
        algorithm_id=algorithm,
        measurements=[
            _mean_with_sd(roi.mean_hu, roi.sd_hu),
            _quantity(codes.AREA, roi.area_mm2, codes.SQUARE_MILLIMETER),
        ],
    )


def _liver_group(
    series: CTSeries, result: AnalysisResult, seg: hd.seg.Segmentation, uids: OutputUids
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = []
    if result.volumetric_hu is not None:
        measurements.append(
            _hu(codes.ATTENUATION_COEFFICIENT, result.volumetric_hu, derivation=codes.MEAN, method=codes.DL_VOLUMETRIC)
        )
    if result.liver_volume_ml is not None:
        measurements.append(_quantity(codes.VOLUME, result.liver_volume_ml, codes.MILLILITER))
    model = None
    if result.model.name != USER_MASK.name:
        model = hd.sr.AlgorithmIdentification(
            name=result.model.name, version=result.model.version, family=codes.ARTIFICIAL_INTELLIGENCE
        )
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=LIVER_SEGMENT,
        source_series=hd.sr.SourceSeriesForSegmentation(series.series_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=LIVER_TRACKING_ID, uid=uids.tracking(LIVER_TRACKING_ID)
        ),
        referenced_segment=segment,
        finding_category=codes.ANATOMICAL_STRUCTURE,
        finding_type=codes.LIVER,
        finding_sites=[hd.sr.FindingSite(codes.LIVER)],
        algorithm_id=model,
        measurements=measurements,
    )


def without_tags(message: str) -> str:
    """``message`` without DICOM tag numbers: what a radiologist reads (the SR comments keep them)."""
    text = re.sub(r"\(\s*\)", "", _TAGS.sub("", _SEE_TAGS.sub("", message)))
    return re.sub(r"\s+([,;:.)])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()


def graded_value(result: AnalysisResult) -> float | None:
    """The value the grade rests on: ``graded_hu``, or the seed-exact DL-parenchymal when unset."""
    return result.graded_hu if result.graded_hu is not None else result.parenchymal_hu


def graded_value_differs(result: AnalysisResult) -> bool:
    """Whether replaced ROIs made the graded value differ from the seed-exact DL-parenchymal (at 0.01 HU)."""
    graded = graded_value(result)
    if graded is None:
        return False
    return result.parenchymal_hu is None or round(graded, 2) != round(result.parenchymal_hu, 2)


def replaced_rois(result: AnalysisResult) -> list[RoiMeasurement]:
    return [roi for roi in sorted(result.rois, key=lambda r: r.label) if roi.rule is not RoiRule.SEED]


def grade_sentence(result: AnalysisResult) -> str:
    """The grade in words, as a radiologist reads it (SR Summary text and key image headline).

    The graded value first, naming any ROI that replaced a seed ROI; the borderline warning
    when it lies within the method's error of the threshold; the seed-exact DL-parenchymal
    when replaced ROIs made the graded value differ (the grade's basis in full is a Comment of
    the SR and a line of the key image). No DICOM tag numbers.
    """
    threshold = f"{result.threshold_hu:g} HU"
    graded = graded_value(result)
    if result.grade is Grade.NOT_GRADED or graded is None:
        reasons = "; ".join(without_tags(finding.message) for finding in result.reasons) or "no reason recorded"
        return _full_stop(f"Not graded: {reasons}")
    differs = graded_value_differs(result)
    value = f"{graded:.1f} HU"
    replaced = replaced_rois(result)
    if differs:
        names = ", ".join(roi_name(roi) for roi in replaced) or "replaced ROIs"
        value += f" with {names} as replacement{'s' if len(replaced) > 1 else ''}"
    measured = f"DL-parenchymal liver attenuation {value}"
    if result.grade is Grade.MODERATE_TO_SEVERE:
        sentence = f"Moderate-to-severe hepatic steatosis: {measured} (< {threshold})"
    else:
        sentence = (
            f"Moderate-to-severe hepatic steatosis not shown: {measured} "
            f"(threshold < {threshold}; mild steatosis not excluded)"
        )
    if result.borderline:
        sentence += (
            f", within {result.borderline_margin_hu:g} HU of the {threshold} threshold: borderline, review the image"
        )
    if differs:
        seed = "not measured" if result.parenchymal_hu is None else f"{result.parenchymal_hu:.1f} HU"
        sentence += f"; seed-exact DL-parenchymal {seed}"
    return _full_stop(sentence)


def _full_stop(sentence: str) -> str:
    """End with a full stop: OHIF runs the report's texts together on one line."""
    return sentence if sentence.endswith(".") else f"{sentence}."


def summary_title(result: AnalysisResult) -> hd.sr.CodedConcept:
    """The summary SR's title: the document and its outcome, what a text view shows first."""
    return _SUMMARY_TITLE[result.grade]


def grade_evaluations(result: AnalysisResult) -> list[hd.sr.QualitativeEvaluation]:
    """"Moderate-to-severe hepatic steatosis": Present / Not detected / Undetermined; then
    "Certainty of Finding": Equivocal when the graded value is borderline."""
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.MODERATE_TO_SEVERE_STEATOSIS, value=_GRADE_VALUE[result.grade])]
    if result.borderline and result.grade is not Grade.NOT_GRADED:
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.CERTAINTY_OF_FINDING, value=codes.EQUIVOCAL))
    return evaluations


def _grade_measurements(result: AnalysisResult) -> list[hd.sr.Measurement]:
    """The graded value, the seed-exact DL-parenchymal when it differs, DL-axial and the threshold.

    A series measured but not graded (contrast, a failed ROI) still carries its seed-exact
    DL-parenchymal: the number is what research reads, the "undetermined" grade beside it says
    that no grade rests on it.
    """
    measurements = []
    graded = graded_value(result)
    if result.grade is Grade.NOT_GRADED and result.parenchymal_hu is not None:
        measurements.append(
            _hu(codes.ATTENUATION_COEFFICIENT, result.parenchymal_hu, derivation=codes.MEAN, method=codes.DL_PARENCHYMAL)
        )
    if graded is not None and result.grade is not Grade.NOT_GRADED:
        differs = graded_value_differs(result)
        method = codes.DL_PARENCHYMAL_REPLACED if differs else codes.DL_PARENCHYMAL
        measurements.append(_hu(codes.ATTENUATION_COEFFICIENT, graded, derivation=codes.MEAN, method=method))
        if differs and result.parenchymal_hu is not None:
            measurements.append(
                _hu(codes.ATTENUATION_COEFFICIENT, result.parenchymal_hu, derivation=codes.MEAN,
                    method=codes.DL_PARENCHYMAL)
            )  # fmt: skip
    if result.axial_hu is not None:
        measurements.append(
            _hu(codes.ATTENUATION_COEFFICIENT, result.axial_hu, derivation=codes.MEAN, method=codes.DL_AXIAL)
        )
    measurements.append(_hu(codes.THRESHOLD_ATTENUATION_COEFFICIENT, result.threshold_hu))
    return measurements


def _grade_texts(result: AnalysisResult, site: OutputSettings) -> list[tuple[hd.sr.CodedConcept, str]]:
    """Summary sentence, the site's disclaimer, the grade's basis, reasons and warnings."""
    texts = [(codes.SUMMARY, grade_sentence(result))]
    if site.disclaimer.strip():
        texts.append((codes.COMMENT, site.disclaimer))
    if result.grade is not Grade.NOT_GRADED and graded_value_differs(result) and result.grade_basis:
        texts.append((codes.COMMENT, f"Grade basis: {result.grade_basis}"))
    findings = (*(result.reasons if result.grade is Grade.NOT_GRADED else ()), *result.warnings)
    texts += [(codes.COMMENT, f"{finding.code.value}: {finding.message}") for finding in findings]
    return texts


def _grade_group(
    result: AnalysisResult, uids: OutputUids, site: OutputSettings
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    parameters = [f"threshold_hu={result.threshold_hu:g}"]
    if result.borderline_margin_hu:
        parameters.append(f"borderline_margin_hu={result.borderline_margin_hu:g}")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=GRADE_TRACKING_ID, uid=uids.tracking(GRADE_TRACKING_ID)
        ),
        finding_type=codes.STEATOSIS_OF_LIVER,
        finding_sites=[hd.sr.FindingSite(codes.LIVER)],
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=GRADING_ALGORITHM_NAME, version=result.software_version, parameters=parameters
        ),
        measurements=_grade_measurements(result),
        qualitative_evaluations=grade_evaluations(result),
    )
    for name, text in _grade_texts(result, site):
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        )
    return group


def device_observer(site: OutputSettings) -> hd.sr.ObservationContext:
    """This node as the device observer (TID 1004)."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=site.device_uid or derived_uid("device", site.station_name),
                name=site.station_name,
                manufacturer_name=site.manufacturer,
                model_name=site.model_name,
                serial_number=site.device_serial_number,
            ),
        )
    )


def _roi_slices(series: CTSeries, circles: list[CirclePlacement]) -> list[Dataset]:
    """The source slices the circles lie on, in series order."""
    return [series.datasets[k] for k in sorted({circle.slice_index for circle in circles})]


@dataclass(frozen=True)
class _Document:
    """What differs between the two SR documents; everything else is shared."""

    role: str
    title: hd.sr.CodedConcept
    series_number: int
    series_description: str
    groups: list[_Group]
    library: list[Dataset]
    evidence: list[Dataset]


def _comprehensive_sr(
    document: _Document, result: AnalysisResult, uids: OutputUids, site: OutputSettings, created: datetime
) -> hd.sr.Comprehensive3DSR:
    report = hd.sr.MeasurementReport(
        observation_context=device_observer(site),
        procedure_reported=codes.CT_UNSPECIFIED_BODY_REGION,
        imaging_measurements=document.groups,
        title=document.title,
        referenced_images=document.library or None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=document.evidence,
        content=report,
        series_instance_uid=uids.series(document.role),
        series_number=document.series_number,
        sop_instance_uid=uids.instance(document.role),
        instance_number=1,
        **site.equipment_kwargs(result.software_version),
        is_complete=True,
        is_final=False,  # PreliminaryFlag PRELIMINARY: a machine result awaiting a radiologist's review
        is_verified=False,  # VerificationFlag UNVERIFIED: no one has signed it
        series_description=document.series_description,
        coding_schemes=[
            CodingSchemeIdentificationItem(designator=codes.LIVERFAT_SCHEME, name=codes.LIVERFAT_SCHEME_NAME)
        ],
        **creation_kwargs(created),
    )
    sr.StationName = site.station_name
    stamp_instance_creation(sr, created)
    logger.info("SR %s (%s): %d measurement groups", sr.SOPInstanceUID, document.role, len(document.groups))
    return sr


def build_circle_sr(
    series: CTSeries, result: AnalysisResult, uids: OutputUids, site: OutputSettings, created: datetime
) -> hd.sr.Comprehensive3DSR:
    """The Imaging Measurement Report with one CIRCLE group per ROI (what OHIF draws).

    Raises
    ------
    ValueError
        When ``result`` has no ROIs (a TID 1500 report needs at least one group);
        ``write_outputs`` writes no circle SR then.
    """
    if not result.rois:
        raise ValueError(f"result for series {result.series_uid} has no ROIs; a circle SR needs at least one")
    algorithm = hd.sr.AlgorithmIdentification(
        name=ROI_ALGORITHM_NAME, version=result.software_version, family=codes.MORPHOLOGICAL_OPERATIONS
    )
    rois = sorted(result.rois, key=lambda r: r.label)
    circles = place_circles(series.datasets, rois)
    groups: list[_Group] = [_roi_group(series, roi, circle, uids, algorithm) for roi, circle in zip(rois, circles)]
    document = _Document(
        role=CIRCLE_SR_ROLE,
        title=codes.IMAGING_MEASUREMENT_REPORT,
        series_number=site.sr_series_number,
        series_description=CIRCLE_SERIES_DESCRIPTION,
        groups=groups,
        library=_roi_slices(series, circles),
        evidence=list(series.datasets),
    )
    return _comprehensive_sr(document, result, uids, site, created)


def build_summary_sr(
    series: CTSeries,
    result: AnalysisResult,
    seg: hd.seg.Segmentation | None,
    uids: OutputUids,
    site: OutputSettings,
    created: datetime,
) -> hd.sr.Comprehensive3DSR:
    """The grade, graded value, DL-axial, threshold, disclaimer and reasons, then the liver group (if ``seg``).

    Written for every result, graded or not; OHIF shows it as a text page (see the
    module docstring for the title). ``seg`` (when written) is referenced by the liver
    group. Only the source datasets of ``series`` are read, so a headers-only series
    works for a result without ROIs (the "not applicable" report of a rejected series).
    """
    groups: list[_Group] = [_grade_group(result, uids, site)]
    if seg is not None:
        groups.append(_liver_group(series, result, seg, uids))
    document = _Document(
        role=SUMMARY_SR_ROLE,
        title=summary_title(result),
        series_number=site.sr_summary_series_number,
        series_description=SUMMARY_SERIES_DESCRIPTION,
        groups=groups,
        library=[],
        evidence=list(series.datasets) + ([seg] if seg is not None else []),
    )
    return _comprehensive_sr(document, result, uids, site, created)
