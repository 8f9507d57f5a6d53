"""Reasons and the one exception type of liverfat.

Every rejection or failure carries a machine-readable ``Reason`` code and a message a
PACS administrator can act on: what was seen, what was expected, and which tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Machine-readable codes; the string value is what lands in JSON and logs."""

    # reading
    NOT_DICOM = "not_dicom"
    NOT_CT = "not_ct"
    NO_PIXEL_DATA = "no_pixel_data"
    MISSING_ATTRIBUTE = "missing_attribute"
    DECODE_FAILED = "decode_failed"
    MIXED_SIZES = "mixed_sizes"
    DUPLICATE_POSITIONS = "duplicate_positions"
    UNEVEN_SPACING = "uneven_spacing"
    GANTRY_TILT = "gantry_tilt"
    TOO_FEW_SLICES = "too_few_slices"
    NOT_READABLE = "not_readable"
    NOT_FOUND = "not_found"  # an input path that does not exist
    EMPTY_FOLDER = "empty_folder"  # an input folder that holds no files
    VOLUME_TOO_LARGE = "volume_too_large"  # more voxels than the reader will allocate
    INVALID_ATTRIBUTE = "invalid_attribute"  # present but unusable: NaN, an unknown VR or character set, a size out of range
    # eligibility (header only)
    LOCALIZER = "localizer"
    DERIVED_IMAGE = "derived_image"
    NOT_AXIAL = "not_axial"
    NOT_CHEST = "not_chest"
    ABDOMINAL = "abdominal"
    CONTRAST = "contrast"
    SLICE_TOO_THICK = "slice_too_thick"
    # analysis
    NO_LIVER = "no_liver"
    LIVER_AT_EDGE = "liver_at_edge"
    ROI_OUTSIDE_LIVER = "roi_outside_liver"
    ROI_ON_VESSEL = "roi_on_vessel"
    IMAGE_SUGGESTS_CONTRAST = "image_suggests_contrast"
    MASK_MISMATCH = "mask_mismatch"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    NO_HEADERS = "no_headers"
    ROI_NOT_PLACED = "roi_not_placed"
    UNSUPPORTED_MULTIFRAME = "unsupported_multiframe"
    NOT_CT_IMAGE = "not_ct_image"  # the pixels are not a CT's (a label map, a mask, a photo)
    REGION_FROM_IMAGE = "region_from_image"  # headers silent on the body part; the image decided
    ROI_REPLACED = "roi_replaced"  # a seed ROI failed its checks and another took its place
    # node (service)
    CONFIG_INVALID = "config_invalid"
    SPOOL_FULL = "spool_full"
    SPOOL_WRITE_FAILED = "spool_write_failed"
    SPOOL_IN_USE = "spool_in_use"
    UNKNOWN_SERIES = "unknown_series"
    # fleet (service/fleet)
    BROKER_UNAVAILABLE = "broker_unavailable"  # the message broker cannot be reached
    DEAD_LETTERED = "dead_lettered"  # the series stopped its worker as often as the broker's delivery limit allows
    # models
    MODEL_IMPORT_FAILED = "model_import_failed"


@dataclass(frozen=True)
class Finding:
    """One reason with its human message, as reported in JSON (``{code, message}``)."""

    code: Reason
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


class LiverfatError(Exception):
    """A failure with a reason code and an actionable message."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def finding(self) -> Finding:
        return Finding(self.reason, self.message)
