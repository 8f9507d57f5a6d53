"""What a site configures about the DICOM outputs: texts, this node's identity, series numbers.

Kept apart from the writers so that the node's configuration can hold it without importing
highdicom.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TypedDict

DEFAULT_DISCLAIMER = (
    "For research / decision support only. Not a diagnosis: "
    "a radiologist must review the images and the measurement regions."
)


class EquipmentKwargs(TypedDict):
    """General Equipment attributes, as highdicom's keyword arguments (see ``equipment_kwargs``)."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    institution_name: str | None
    institutional_department_name: str | None


@dataclass(frozen=True)
class OutputSettings:
    """What a site configures about its outputs (text, identity of this node, series numbers).

    ``station_name`` doubles as the device observer's name in the SR; use the node's AE
    title. ``device_uid`` identifies this node as the SR's device observer; when None it
    is derived from ``station_name``, so it stays the same across restarts.
    """

    disclaimer: str = DEFAULT_DISCLAIMER
    manufacturer: str = "liverfat"
    model_name: str = "liverfat"
    station_name: str = "LIVERFAT"
    device_serial_number: str = "1"
    device_uid: str | None = None
    institution_name: str | None = None
    institutional_department_name: str | None = None
    seg_series_number: int = 9901
    sr_series_number: int = 9902
    keyimage_series_number: int = 9903
    sr_summary_series_number: int = 9904

    def __post_init__(self) -> None:
        limits = {"station_name": 16, "manufacturer": 64, "model_name": 64, "device_serial_number": 64,
                  "institution_name": 64, "institutional_department_name": 64}
        for name, limit in limits.items():
            value = getattr(self, name)
            if value is not None and not 0 < len(value) <= limit:
                raise ValueError(f"output setting {name}={value!r} must have 1 to {limit} characters")
        for name in ("seg_series_number", "sr_series_number", "keyimage_series_number", "sr_summary_series_number"):
            if not 0 < getattr(self, name) < 2**31:
                raise ValueError(f"output setting {name}={getattr(self, name)} must be a positive integer below 2**31")

    def equipment_kwargs(self, software_version: str) -> EquipmentKwargs:
        """The General Equipment attributes every output carries, as highdicom's keyword arguments."""
        return {
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.model_name,
            "software_versions": software_version,
            "device_serial_number": self.device_serial_number,
            "institution_name": self.institution_name,
            "institutional_department_name": self.institutional_department_name,
        }

    def digest(self) -> str:
        """SHA-256 of every setting: a changed disclaimer or identity gives new UIDs."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
