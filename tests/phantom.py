"""Synthetic chest-CT phantoms with a liver of known attenuation, written as real DICOM.

The phantom is defined analytically in LPS patient coordinates, so the same anatomy can be
rendered on any grid: head-first or feet-first, flipped rows or columns, uneven spacing.
Tests compare measurements against the analytic truth, whatever the storage order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from liverfat.volume import Volume

AIR_HU = -1000.0


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # LPS mm
    semi_axes: tuple[float, float, float]  # mm along L, P, S
    hu: float

    def contains(self, lps: np.ndarray) -> np.ndarray:
        offset = (lps - np.asarray(self.centre)) / np.asarray(self.semi_axes)
        return (offset**2).sum(axis=-1) <= 1.0


@dataclass(frozen=True)
class Phantom:
    """A body cylinder-like ellipsoid with a liver on the patient's right and a spleen on the left."""

    noise_sd_hu: float = 8.0
    body: Ellipsoid = Ellipsoid((0.0, 0.0, 0.0), (160.0, 115.0, 400.0), 35.0)
    liver: Ellipsoid = Ellipsoid((-65.0, -5.0, 0.0), (75.0, 85.0, 60.0), 55.0)
    spleen: Ellipsoid = Ellipsoid((85.0, 35.0, 15.0), (30.0, 40.0, 40.0), 48.0)
    seed: int = 7

    def with_liver_hu(self, hu: float) -> Phantom:
        return replace(self, liver=replace(self.liver, hu=hu))

    def hu_at(self, lps: np.ndarray) -> np.ndarray:
        hu = np.full(lps.shape[:-1], AIR_HU, dtype=np.float32)
        hu[self.body.contains(lps)] = self.body.hu
        hu[self.spleen.contains(lps)] = self.spleen.hu
        hu[self.liver.contains(lps)] = self.liver.hu
        rng = np.random.default_rng(self.seed)
        inside = hu > AIR_HU
        hu[inside] += rng.normal(0.0, self.noise_sd_hu, size=int(inside.sum())).astype(np.float32)
        return hu

    def liver_at(self, lps: np.ndarray) -> np.ndarray:
        return self.liver.contains(lps)


@dataclass(frozen=True)
class Grid:
    """Where slices lie: in-plane axes and spacing, and the position of each slice along the normal."""

    rows: int = 256
    columns: int = 256
    pixel_spacing_mm: float = 1.4
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)  # direction of increasing column index
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)  # direction of increasing row index
    slice_positions_mm: Sequence[float] = field(default_factory=lambda: tuple(np.arange(-75.0, 75.1, 2.5)))
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def slice_origin(self, position_mm: float) -> np.ndarray:
        """LPS position of the first pixel of the slice at ``position_mm`` along the normal."""
        row = np.asarray(self.row_direction)
        col = np.asarray(self.column_direction)
        half_width = (self.columns - 1) / 2 * self.pixel_spacing_mm
        half_height = (self.rows - 1) / 2 * self.pixel_spacing_mm
        return np.asarray(self.centre) - row * half_width - col * half_height + self.normal * position_mm

    def slice_points(self, position_mm: float) -> np.ndarray:
        """LPS positions ``(rows, columns, 3)`` of every pixel of one slice."""
        j, i = np.mgrid[0 : self.rows, 0 : self.columns].astype(np.float64)
        spacing = self.pixel_spacing_mm
        return (
            self.slice_origin(position_mm)
            + i[..., None] * spacing * np.asarray(self.row_direction)
            + j[..., None] * spacing * np.asarray(self.column_direction)
        )


def render(phantom: Phantom, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """HU and liver-mask arrays ``(slices, rows, columns)`` in ``grid.slice_positions_mm`` order."""
    points = np.stack([grid.slice_points(p) for p in grid.slice_positions_mm])
    return phantom.hu_at(points), phantom.liver_at(points)


def render_volume(phantom: Phantom, grid: Grid) -> tuple[Volume, Volume]:
    """The phantom as (HU volume, liver mask volume); needs evenly spaced slices."""
    hu, liver = render(phantom, grid)
    positions = np.asarray(grid.slice_positions_mm, dtype=np.float64)
    steps = np.diff(positions)
    if len(steps) and not np.allclose(steps, steps[0]):
        raise ValueError("render_volume needs evenly spaced slices")
    step = float(steps[0]) if len(steps) else 1.0
    direction = np.column_stack([grid.row_direction, grid.column_direction, grid.normal * np.sign(step)])
    spacing = (grid.pixel_spacing_mm, grid.pixel_spacing_mm, abs(step))
    origin = tuple(grid.slice_origin(positions[0]))
    return Volume(hu, spacing, origin, direction), Volume(liver, spacing, origin, direction)


def storage_variants(grid: Grid) -> dict[str, Grid]:
    """The same voxel centres stored five ways: as given, slices reversed (feet-first order),
    rows flipped, columns flipped, rows and columns swapped (the normal flips with the last
    three, so the slice positions are negated to stay at the same z)."""
    positions = tuple(float(p) for p in grid.slice_positions_mm)
    negated = tuple(-p for p in positions)

    def flip(vector: tuple[float, float, float]) -> tuple[float, float, float]:
        return (-vector[0], -vector[1], -vector[2])

    return {
        "head-first": grid,
        "feet-first": replace(grid, slice_positions_mm=positions[::-1]),
        "rows-flipped": replace(grid, column_direction=flip(grid.column_direction), slice_positions_mm=negated),
        "columns-flipped": replace(grid, row_direction=flip(grid.row_direction), slice_positions_mm=negated),
        "transposed": replace(
            grid,
            rows=grid.columns,
            columns=grid.rows,
            row_direction=grid.column_direction,
            column_direction=grid.row_direction,
            slice_positions_mm=negated,
        ),
    }


@dataclass(frozen=True)
class SeriesHeader:
    """Header choices for a written series; defaults describe an unenhanced chest CT."""

    study_description: str = "CT CHEST WO CONTRAST"
    series_description: str = "AXIAL 2.5 SOFT TISSUE"
    protocol_name: str = "CHEST ROUTINE"
    body_part: str | None = "CHEST"
    contrast_agent: str | None = None
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    patient_position: str = "HFS"
    slice_thickness_mm: float = 2.5
    patient_name: str = "PHANTOM^LIVER"
    patient_id: str = "PHANTOM-001"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)


def write_series(
    folder: Path,
    phantom: Phantom,
    grid: Grid,
    header: SeriesHeader | None = None,
    *,
    shuffle_instance_numbers: bool = True,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series, one file per slice, and return the paths.

    Instance numbers are deliberately not in position order when ``shuffle_instance_numbers``,
    so readers that sort by InstanceNumber or file name fail the tests.
    """
    header = header or SeriesHeader()
    folder.mkdir(parents=True, exist_ok=True)
    hu, _ = render(phantom, grid)
    n_slices = len(grid.slice_positions_mm)
    order = np.random.default_rng(3).permutation(n_slices) if shuffle_instance_numbers else np.arange(n_slices)
    paths = []
    for index, position in enumerate(grid.slice_positions_mm):
        ds = _ct_dataset(header, grid, float(position), hu[index], instance_number=int(order[index]) + 1)
        path = folder / f"slice_{int(order[index]):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_dataset(header: SeriesHeader, grid: Grid, position_mm: float, hu: np.ndarray, instance_number: int) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "liverfat test phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = header.study_description
    ds.SeriesDescription = header.series_description
    ds.ProtocolName = header.protocol_name
    if header.body_part is not None:
        ds.BodyPartExamined = header.body_part
    if header.contrast_agent is not None:
        ds.ContrastBolusAgent = header.contrast_agent
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientPosition = header.patient_position
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImageType = list(header.image_type)
    ds.KVP = 120
    ds.SliceThickness = header.slice_thickness_mm
    ds.ImagePositionPatient = [round(float(v), 4) for v in grid.slice_origin(position_mm)]
    ds.ImageOrientationPatient = [float(v) for v in (*grid.row_direction, *grid.column_direction)]
    ds.SliceLocation = round(float(position_mm), 4)
    ds.PixelSpacing = [grid.pixel_spacing_mm, grid.pixel_spacing_mm]
    ds.Rows = grid.rows
    ds.Columns = grid.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    stored = np.clip(np.round(hu + 1024.0), -32768, 32767).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def read_back(path: Path) -> Dataset:
    return pydicom.dcmread(path)
