"""TID 1500 Measurement Report (Comprehensive 3D SR) of one liverfat result.

Content tree (PS3.16 TID 1500, built with ``highdicom.sr.MeasurementReport``)::

    Imaging Measurement Report
      Language, observation context (device observer = this node), procedure reported
      Image Library (the CT slices the circles lie on)
      Imaging Measurements
        Measurement Group "liverfat liver ROI n"   (TID 1410, one per circle)
          tracking identifier + UID (the same as the ROI's SEG segment)
          CIRCLE image region on its source CT slice
          finding site Liver, algorithm identification (TID 4019)
          Attenuation Coefficient [hnsf'U], derivation Mean
          Attenuation Coefficient [hnsf'U], derivation Standard Deviation
          Area [mm2]
        Measurement Group "liverfat liver"          (TID 1411)
          Referenced Segment: SEG segment 1 (liver)
          Attenuation Coefficient, Mean, method DL-volumetric; Volume [ml]
        Measurement Group "liverfat steatosis"      (TID 1501)
          finding Steatosis of liver, finding site Liver
          Attenuation Coefficient, Mean, method DL-parenchymal (and DL-axial)
          Threshold Attenuation Coefficient [hnsf'U]
          Steatosis of liver (severity moderate to severe): Present / Absent / Undetermined
          TEXT Summary: the grade in words; TEXT Comment: each reason when withheld, each warning

OHIF caveats (OHIF v3, ``extensions/cornerstone-dicom-sr``), which shaped the encoding:

- OHIF draws only groups with a SCOORD, keyed by the Tracking Unique Identifier, and
  labels them with the NUM items as "CodeMeaning: value unit". The circles therefore
  are TID 1410 groups with a CIRCLE SCOORD on the source slice, in (column, row) image
  coordinates where (0.5, 0.5) is the centre of the first pixel (PS3.3 C.18.6, SCOORD).
  The SD carries the same concept name as the mean (only the derivation differs), so
  OHIF shows two "Attenuation Coefficient" labels per circle: the first is the mean.
- OHIF does not show CODE items (the grade) or TEXT items at all; the grade is readable
  in OHIF through the key image, and in any SR text renderer through the Summary TEXT.
- OHIF reads the Image Library unconditionally, so it is always written.
- For groups without a SCOORD OHIF reads each NUM's ContentSequence without checking
  that it exists; every NUM here therefore has children (finding site at least).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from liverfat.dicom_io import codes
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.seg import LIVER_SEGMENT, LIVER_TRACKING_ID, ROI_ALGORITHM_NAME, roi_tracking_id
from liverfat.dicom_io.uids import OutputUids, creation_kwargs, derived_uid, stamp_instance_creation
from liverfat.result import USER_MASK, AnalysisResult, Grade, RoiMeasurement

if TYPE_CHECKING:
    from liverfat.dicom_io.outputs import OutputSettings

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "liverfat steatosis report"
GRADE_TRACKING_ID = "liverfat steatosis"
GRADING_ALGORITHM_NAME = "liverfat DL-parenchymal grading"

_GRADE_VALUE = {
    Grade.MODERATE_TO_SEVERE: codes.PRESENT,
    Grade.NONE_OR_MILD: codes.ABSENT,
    Grade.NOT_GRADED: codes.UNDETERMINED,
}


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
    transformed = []
    candidates = range(len(datasets)) if slice_index is None else [slice_index]
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


def _hu(
    name: hd.sr.CodedConcept,
    value: float,
    *,
    derivation: hd.sr.CodedConcept | None = None,
    method: hd.sr.CodedConcept | None = None,
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name,
        value=round(float(value), 2),
        unit=codes.HOUNSFIELD_UNIT,
        derivation=derivation,
        method=method,
        finding_sites=[hd.sr.FindingSite(codes.LIVER)],
    )


def _quantity(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name, value=round(float(value), 1), unit=unit, finding_sites=[hd.sr.FindingSite(codes.LIVER)]
    )


def _roi_group(
    series: CTSeries, roi: RoiMeasurement, uids: OutputUids, algorithm: hd.sr.AlgorithmIdentification
) -> tuple[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, int]:
    circle = place_circle(series.datasets, roi.centre_lps, roi.radius_mm)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=circle.graphic_data,
        source_image=hd.sr.SourceImageForRegion.from_source_image(series.datasets[circle.slice_index]),
    )
    tracking_id = roi_tracking_id(roi.label)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=tracking_id, uid=uids.tracking(tracking_id)),
        referenced_region=region,
        finding_sites=[hd.sr.FindingSite(codes.LIVER)],
        algorithm_id=algorithm,
        measurements=[
            _hu(codes.ATTENUATION_COEFFICIENT, roi.mean_hu, derivation=codes.MEAN),
            _hu(codes.ATTENUATION_COEFFICIENT, roi.sd_hu, derivation=codes.STANDARD_DEVIATION),
            _quantity(codes.AREA, roi.area_mm2, codes.SQUARE_MILLIMETER),
        ],
    )
    return group, circle.slice_index


def _liver_group(
    result: AnalysisResult, seg: hd.seg.Segmentation, uids: OutputUids
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
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=LIVER_TRACKING_ID, uid=uids.tracking(LIVER_TRACKING_ID)
        ),
        referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=LIVER_SEGMENT),
        finding_category=codes.ANATOMICAL_STRUCTURE,
        finding_type=codes.LIVER,
        finding_sites=[hd.sr.FindingSite(codes.LIVER)],
        algorithm_id=model,
        measurements=measurements,
    )


def grade_sentence(result: AnalysisResult) -> str:
    """The grade in words, as a radiologist reads it (SR Summary text and key image)."""
    threshold = f"{result.threshold_hu:g} HU"
    if result.grade is Grade.NOT_GRADED or result.parenchymal_hu is None:
        reasons = "; ".join(finding.message for finding in result.reasons) or "no reason recorded"
        return f"Not graded: {reasons}"
    measured = f"DL-parenchymal liver attenuation {result.parenchymal_hu:.1f} HU"
    if result.grade is Grade.MODERATE_TO_SEVERE:
        return f"Moderate-to-severe hepatic steatosis: {measured} (< {threshold})"
    return f"No moderate-to-severe hepatic steatosis: {measured} (threshold < {threshold})"


def grade_evaluation(grade: Grade) -> hd.sr.QualitativeEvaluation:
    """"Steatosis of liver" qualified by severity "Moderate to severe": Present/Absent/Undetermined."""
    evaluation = hd.sr.QualitativeEvaluation(name=codes.STEATOSIS_OF_LIVER, value=_GRADE_VALUE[grade])
    evaluation[0].ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=codes.SEVERITY,
                value=codes.MODERATE_TO_SEVERE,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        ]
    )
    return evaluation


def _grade_group(
    result: AnalysisResult, sources: list[Dataset], uids: OutputUids
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = []
    if result.parenchymal_hu is not None:
        measurements.append(
            _hu(
                codes.ATTENUATION_COEFFICIENT, result.parenchymal_hu, derivation=codes.MEAN, method=codes.DL_PARENCHYMAL
            )
        )
    if result.axial_hu is not None:
        measurements.append(
            _hu(codes.ATTENUATION_COEFFICIENT, result.axial_hu, derivation=codes.MEAN, method=codes.DL_AXIAL)
        )
    measurements.append(_hu(codes.THRESHOLD_ATTENUATION_COEFFICIENT, result.threshold_hu))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=GRADE_TRACKING_ID, uid=uids.tracking(GRADE_TRACKING_ID)
        ),
        finding_type=codes.STEATOSIS_OF_LIVER,
        finding_sites=[hd.sr.FindingSite(codes.LIVER)],
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=GRADING_ALGORITHM_NAME,
            version=result.software_version,
            parameters=[f"threshold_hu={result.threshold_hu:g}"],
        ),
        measurements=measurements,
        qualitative_evaluations=[grade_evaluation(result.grade)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    )
    texts = [(codes.SUMMARY, grade_sentence(result))]
    findings = (*(result.reasons if result.grade is Grade.NOT_GRADED else ()), *result.warnings)
    texts += [(codes.COMMENT, f"{finding.code.value}: {finding.message}") for finding in findings]
    for name, text in texts:
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


def build_sr(
    series: CTSeries,
    result: AnalysisResult,
    seg: hd.seg.Segmentation | None,
    uids: OutputUids,
    site: OutputSettings,
    created: datetime,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``result``; ``seg`` (when written) is referenced by the liver group."""
    roi_algorithm = hd.sr.AlgorithmIdentification(
        name=ROI_ALGORITHM_NAME, version=result.software_version, family=codes.MORPHOLOGICAL_OPERATIONS
    )
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    roi_slices: list[int] = []
    for roi in sorted(result.rois, key=lambda r: r.label):
        group, k = _roi_group(series, roi, uids, roi_algorithm)
        groups.append(group)
        roi_slices.append(k)
    if seg is not None:
        groups.append(_liver_group(result, seg, uids))
    slice_indices = sorted(set(roi_slices)) or [len(series.datasets) // 2]
    sources = [series.datasets[k] for k in slice_indices]
    groups.append(_grade_group(result, sources, uids))
    report = hd.sr.MeasurementReport(
        observation_context=device_observer(site),
        procedure_reported=codes.CT_UNSPECIFIED_BODY_REGION,
        imaging_measurements=groups,
        title=codes.IMAGING_MEASUREMENT_REPORT,
        referenced_images=sources,
    )
    # the liver group's Referenced Segment cites every source slice of the liver segment
    evidence = list(series.datasets) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series("sr"),
        series_number=site.sr_series_number,
        sop_instance_uid=uids.instance("sr"),
        instance_number=1,
        manufacturer=site.manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=False,
        institution_name=site.institution_name,
        institutional_department_name=site.institutional_department_name,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=site.model_name,
        software_versions=result.software_version,
        device_serial_number=site.device_serial_number,
        coding_schemes=[
            CodingSchemeIdentificationItem(designator=codes.LIVERFAT_SCHEME, name=codes.LIVERFAT_SCHEME_NAME)
        ],
        **creation_kwargs(created),
    )
    sr.StationName = site.station_name
    stamp_instance_creation(sr, created)
    logger.info("SR %s: %d measurement groups", sr.SOPInstanceUID, len(groups))
    return sr
