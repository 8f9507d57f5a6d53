"""The out-of-the-box segmentation backend: pyliverlesionseg 0.3's liver U-Net on a 3 mm grid.

Pipeline (``DefaultBackend.predict``), all on the working-grid CT it receives:

1. crop: the bounding box of the body (largest connected component of tissue above -150 HU after
   one erosion, found on a 4x coarser in-plane sampling). This replaces the package's
   pelvis/lung-dome heuristic, which fails on chest CTs that show neither. When the liver found in
   that box lies low in a tall scan (a chest CT), steps 2-5 run a second time on the box cut to the
   package's own z-extent, up to 70 mm above the liver dome (``liver_centred_box``);
2. resampling of the crop to 3 mm isotropic by area averaging, then the window
   ``clip(HU / 1000, -0.2, 0.2) * 2.5`` (``to_network_grid``; see its notes on the package's 1.5 mm
   median step). Steps 1, 2, 4 and 5 work in the array's own axis order, slice by slice where the
   arrays are large; only the small 3 mm image is turned into the network's layout, spatial
   (x, y, z) running to the patient's right, anterior and superior (Keras RAS; ``_Orientation``);
3. the network on tiles of the trained size, 163 x 136 x 136 output voxels (489 x 408 x 408 mm)
   with 13 voxels of context, zero padding outside the crop, overlapping tiles averaged;
4. post-processing at 3 mm as in the package: threshold 0.5, one erosion, the largest
   6-connected component, one dilation (18-connected structuring element);
5. back to the working grid by linear interpolation of the 3 mm mask at each working voxel centre,
   kept where >= 0.5.

Inference runs under ``torch.inference_mode``, single sample, without temporary files or changes to
torch's global settings (threads, cudnn flags): those belong to the application. The network runs in
float32 or, where the hardware has bf16 dot products, in bfloat16 (``precision``, see
``liverfat.inference.models.precision``); everything around it is float32 either way, and the
precision is part of the model's recorded version.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.devices import DEVICE_AUTO, device_label, resolve_device
from liverfat.inference.models.precision import PRECISION_AUTO, Precision, resolve_precision
from liverfat.inference.models.unet import CONTEXT, TRAINED_OUTPUT, LiverUNet, load_keras_weights
from liverfat.inference.models.weights import (
    DEFAULT_MODEL_CACHE,
    SOURCE_PACKAGE,
    SOURCE_VERSION,
    WEIGHTS_SHA256,
    default_weights_path,
    verify_weights,
)
from liverfat.result import ModelInfo
from liverfat.volume import Volume

logger = logging.getLogger(__name__)

MODEL_NAME = "default (pyliverlesionseg 0.3 U-Net)"
NETWORK_SPACING_MM = 3.0
HU_SCALE = 1000.0  # window: clip(HU / 1000, -0.2, 0.2) * 2.5, as the package's CT branch
WINDOW_CLIP = 0.2
WINDOW_GAIN = 2.5
BODY_THRESHOLD_HU = -150.0  # soft tissue and bone; air, lung and most of the table fall below
BODY_SAMPLING_MM = 2.5  # in-plane step of the coarse sampling used to find the body
TILE_OVERLAP = 27  # 3 mm voxels (81 mm) shared by neighbouring tiles along an axis
PROBABILITY_THRESHOLD = 0.5
LIVER_DOME_MARGIN_MM = 70.0  # the package's crop_ct_image: its crops end this far above the liver dome
# A working voxel is liver when the linearly interpolated 3 mm mask reaches 0.5 there. The package
# keeps every voxel the zoomed mask touches (> 0), half a 3 mm voxel too far out: Dice 0.941 vs
# 0.967 on 3D-IRCADb-01 patient 1, 0.928 vs 0.962 on the TotalSegmentator example.
MASK_KEEP_FRACTION = 0.5
_AXIS_ALIGNED_TOLERANCE = 1e-3
_RAS_FROM_LPS = (-1.0, -1.0, 1.0)  # sign of each RAS axis in LPS coordinates
# 18-connected 3x3x3 element: the package's iterate_structure(generate_binary_structure(3, 2), 1)
_MORPHOLOGY = ndimage.generate_binary_structure(3, 2)
_COMPONENTS = ndimage.generate_binary_structure(3, 1)


class DefaultBackend:
    """The pyliverlesionseg 0.3 liver U-Net behind the ``Backend`` protocol.

    Parameters
    ----------
    weights:
        The HDF5 weight file; default: the verified file in ``cache_dir`` (see
        ``liverfat.inference.models.weights``). A given file is checked against the recorded SHA-256 too.
    device:
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    cache_dir:
        The model cache (``[model] cache``) that holds the weights when ``weights`` is not given.
    precision:
        ``"auto"`` (bf16 where the device has bf16 hardware, else fp32), ``"fp32"`` or ``"bf16"``.
    """

    def __init__(self, weights: Path | None = None, device: str = DEVICE_AUTO,
                 cache_dir: Path = DEFAULT_MODEL_CACHE, precision: str = PRECISION_AUTO) -> None:  # fmt: skip
        if weights is None:
            weights = default_weights_path(cache_dir)
        else:
            verify_weights(weights)
        self._device = resolve_device(device)
        self._precision = resolve_precision(precision, self._device)
        model = LiverUNet()
        load_keras_weights(model, weights)
        dtype = torch.bfloat16 if self._precision is Precision.BF16 else torch.float32
        self._model = model.to(self._device).to_precision(dtype).eval()
        self._info = ModelInfo(
            name=MODEL_NAME,
            version=f"{SOURCE_PACKAGE} {SOURCE_VERSION} {self._precision}",
            checksum=f"sha256:{WEIGHTS_SHA256}",
            device=device_label(self._device),
            precision=self._precision.value,
        )
        logger.info("default backend ready on %s in %s (weights %s)", self._info.device, self._precision, weights)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, ct: Volume) -> Volume:
        """Boolean liver mask on ``ct``'s grid (the working grid, HU)."""
        started = time.perf_counter()
        orientation = _Orientation.of(ct)
        spacing = (ct.spacing[2], ct.spacing[1], ct.spacing[0])  # along array axes (k, j, i)
        mask = np.zeros(ct.array.shape, dtype=bool)
        box = body_box(ct.array, spacing)
        if box is None:
            logger.warning("no body above %.0f HU in the volume: empty liver mask", BODY_THRESHOLD_HU)
            return ct.with_array(mask)
        self._segment_box(ct.array, box, spacing, orientation, out=mask)
        liver_box = liver_centred_box(mask, box, spacing, orientation)
        if liver_box is not None:
            mask[...] = False
            self._segment_box(ct.array, liver_box, spacing, orientation, out=mask)
        logger.debug(
            "default backend: body %s, liver-centred %s, %d liver voxels, %.1f s",
            box, liver_box, int(mask.sum()), time.perf_counter() - started,
        )
        return ct.with_array(mask)

    def _segment_box(
        self,
        hu: np.ndarray,
        box: tuple[slice, slice, slice],
        spacing: tuple[float, float, float],
        orientation: _Orientation,
        out: np.ndarray,
    ) -> None:
        """Run the network on the crop ``box`` and write its post-processed mask into ``out[box]``."""
        grid = _CropGrid(box, spacing)
        image = to_network_grid(hu[box], grid)
        network_image = np.ascontiguousarray(orientation.to_network(image))
        probability = orientation.from_network(self._probability(network_image))
        grid.to_working(postprocess(probability), out=out[box])

    def _probability(self, image: np.ndarray) -> np.ndarray:
        """Liver probability on the 3 mm crop, tile by tile."""
        total = np.zeros(image.shape, dtype=np.float32)
        count = np.zeros(image.shape, dtype=np.float32)
        for tile in tiles(image.shape):
            patch = torch.from_numpy(tile.input_patch(image)).to(self._device)
            with torch.inference_mode():
                output = self._model(patch[None, None])[0, 0].float().cpu().numpy()
            inside, output_part = tile.inside(image.shape)
            total[inside] += output[output_part]
            count[inside] += 1.0
        return total / np.maximum(count, 1.0)


@dataclass(frozen=True)
class _Orientation:
    """How the volume's array maps onto the network's (x, y, z) = (right, anterior, superior) layout.

    ``axes[n]`` is the array axis that runs along network axis ``n``; ``flips[n]`` says whether
    it runs the opposite way. Works for any axis-aligned direction matrix, so a flipped or
    permuted storage order comes back as the same physical mask.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def of(cls, volume: Volume) -> _Orientation:
        direction = volume.direction  # columns: LPS direction of index axes i, j, k
        axes, flips = [], []
        for lps_axis in range(3):
            column = int(np.argmax(np.abs(direction[lps_axis])))
            cosine = direction[lps_axis, column]
            if abs(abs(cosine) - 1.0) > _AXIS_ALIGNED_TOLERANCE:
                raise LiverfatError(
                    Reason.NOT_AXIAL,
                    f"the default backend needs an axis-aligned grid; direction {direction.tolist()} is oblique",
                )
            axes.append(2 - column)  # index axis i, j, k is array axis 2, 1, 0
            flips.append(bool(cosine * _RAS_FROM_LPS[lps_axis] < 0))
        if sorted(axes) != [0, 1, 2]:
            raise LiverfatError(Reason.NOT_AXIAL, f"direction {direction.tolist()} does not map axes one to one")
        return cls((axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2]))

    def to_network(self, array: np.ndarray) -> np.ndarray:
        """A view of ``array`` (array axis order) in network layout."""
        view = np.transpose(array, self.axes)
        return view[tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips)]

    def from_network(self, array: np.ndarray) -> np.ndarray:
        unflipped = array[tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips)]
        return np.ascontiguousarray(np.transpose(unflipped, np.argsort(self.axes)))


def body_box(hu: np.ndarray, spacing: Sequence[float]) -> tuple[slice, slice, slice] | None:
    """Bounding box of the body: largest 6-connected component of eroded tissue above -150 HU.

    ``spacing`` is the voxel size along the array's axes. The body is found on a coarse sampling
    (about every ``BODY_SAMPLING_MM``), and the box mapped back to full resolution with one coarse
    step of margin. None when nothing is above the threshold.
    """
    steps = [max(1, round(BODY_SAMPLING_MM / s)) for s in spacing]
    coarse = hu[:: steps[0], :: steps[1], :: steps[2]] > BODY_THRESHOLD_HU
    eroded = ndimage.binary_erosion(coarse, _COMPONENTS)
    labels, count = ndimage.label(eroded if eroded.any() else coarse, _COMPONENTS)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    found = ndimage.find_objects(labels)[int(np.argmax(sizes)) - 1]
    box = []
    for axis, (part, step) in enumerate(zip(found, steps, strict=True)):
        start = max((part.start - 1) * step, 0)
        stop = min(part.stop * step + step, hu.shape[axis])
        box.append(slice(start, stop))
    return box[0], box[1], box[2]


def liver_centred_box(
    liver: np.ndarray,
    body: tuple[slice, slice, slice],
    spacing: Sequence[float],
    orientation: _Orientation,
) -> tuple[slice, slice, slice] | None:
    """The body box cut along the patient's long axis to what the network was trained on, or None.

    The package crops every CT from the hips to ``LIVER_DOME_MARGIN_MM`` above the liver dome
    (``crop_ct_image``), and its network normalises each layer over the whole patch: a chest CT's
    body box, most of it lung above the liver, shifts those statistics and the liver's edges with
    them (LIDC-IDRI-0002: Dice 0.931 on the body box, see ``bench/accuracy.py`` for the figures
    after the second pass). Given the first pass's mask, the box keeps the body's in-plane extent
    and runs from ``LIVER_DOME_MARGIN_MM`` above the highest liver voxel down at most the trained
    patch's height. None when the first pass found no liver or the box would not shrink by at
    least one network voxel (an abdominal scan is segmented once).
    """
    axis = orientation.axes[2]  # the array axis along the patient's long axis
    along = np.flatnonzero(liver.any(axis=tuple(a for a in range(3) if a != axis)))
    if along.size == 0:
        return None
    step = spacing[axis]
    margin = round(LIVER_DOME_MARGIN_MM / step)
    height = int(TRAINED_OUTPUT[2] * NETWORK_SPACING_MM / step)
    start, stop = body[axis].start, body[axis].stop
    if orientation.flips[2]:  # index grows toward the feet: the dome is the smallest index
        start = max(start, int(along[0]) - margin)
        stop = min(stop, start + height)
    else:
        stop = min(stop, int(along[-1]) + 1 + margin)
        start = max(start, stop - height)
    if (body[axis].stop - body[axis].start) - (stop - start) < NETWORK_SPACING_MM / step:
        return None
    box = list(body)
    box[axis] = slice(start, stop)
    return box[0], box[1], box[2]


@dataclass(frozen=True)
class _CropGrid:
    """The 3 mm grid laid over a crop of the working grid, centred on it (as pymirc's zoom3d).

    Axes are the array's own; positions are in millimetres from the crop's first voxel edge.
    The grid is symmetric about the crop's centre, so flipping an axis commutes with resampling.
    """

    box: tuple[slice, slice, slice]
    spacing: tuple[float, float, float]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        sizes = [s.stop - s.start for s in self.box]
        return (sizes[0], sizes[1], sizes[2])

    @property
    def shape(self) -> tuple[int, int, int]:
        extents = [n * s for n, s in zip(self.input_shape, self.spacing, strict=True)]
        sizes = [math.ceil(extent / NETWORK_SPACING_MM - 1e-6) for extent in extents]
        return (sizes[0], sizes[1], sizes[2])

    def offset_mm(self, axis: int) -> float:
        """Position of the 3 mm grid's first voxel edge (<= 0: the grid overhangs both ends equally)."""
        return (self.input_shape[axis] * self.spacing[axis] - self.shape[axis] * NETWORK_SPACING_MM) / 2.0

    def area_weights(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Taps ``(n_out, t)`` averaging the working voxels each 3 mm voxel overlaps, by overlap length."""
        n_in, step = self.input_shape[axis], self.spacing[axis]
        low = self.offset_mm(axis) + NETWORK_SPACING_MM * np.arange(self.shape[axis])
        high = low + NETWORK_SPACING_MM
        first = np.clip(np.floor(low / step).astype(int), 0, n_in - 1)
        taps = math.ceil(NETWORK_SPACING_MM / step) + 1
        index = first[:, None] + np.arange(taps)[None, :]
        overlap = np.minimum(high[:, None], (index + 1) * step) - np.maximum(low[:, None], index * step)
        weight = np.where(index < n_in, np.clip(overlap, 0.0, None), 0.0)
        weight /= weight.sum(axis=1, keepdims=True)
        return np.minimum(index, n_in - 1), weight.astype(np.float32)

    def linear_weights(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Taps ``(n_in, 2)`` interpolating the 3 mm grid at each working voxel centre (edges held)."""
        n_out = self.shape[axis]
        centres = (np.arange(self.input_shape[axis]) + 0.5) * self.spacing[axis]
        position = (centres - self.offset_mm(axis)) / NETWORK_SPACING_MM - 0.5
        position = np.clip(position, 0.0, n_out - 1)
        low = np.minimum(np.floor(position).astype(int), max(n_out - 2, 0))
        fraction = position - low
        index = np.stack([low, np.minimum(low + 1, n_out - 1)], axis=1)
        weight = np.stack([1.0 - fraction, fraction], axis=1)
        return index, weight.astype(np.float32)

    def to_working(self, mask: np.ndarray, out: np.ndarray) -> None:
        """Write the 3 mm mask onto the crop's working voxels ``out`` (linear interpolation, >= 0.5)."""
        if out.shape != self.input_shape:
            raise ValueError(f"output of shape {out.shape} does not match the crop {self.input_shape}")
        values = _apply_taps(mask.astype(np.float32), 0, *self.linear_weights(0))
        taps_1, taps_2 = self.linear_weights(1), self.linear_weights(2)
        for start in range(0, self.input_shape[0], _CHUNK):
            part = _apply_taps(_apply_taps(values[start : start + _CHUNK], 1, *taps_1), 2, *taps_2)
            out[start : start + _CHUNK] = part >= MASK_KEEP_FRACTION


_CHUNK = 32  # slices along z handled at once when resampling full-resolution arrays


def _apply_taps(values: np.ndarray, axis: int, index: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``out[.., o, ..] = sum_t weight[o, t] * values[.., index[o, t], ..]`` along ``axis`` (float32)."""
    shape = [1, 1, 1]
    shape[axis] = index.shape[0]
    out = np.take(values, index[:, 0], axis=axis).astype(np.float32, copy=False)
    out *= weight[:, 0].reshape(shape)
    for tap in range(1, index.shape[1]):
        term = np.take(values, index[:, tap], axis=axis).astype(np.float32, copy=False)
        term *= weight[:, tap].reshape(shape)
        out += term
    return out


def to_network_grid(crop_hu: np.ndarray, grid: _CropGrid) -> np.ndarray:
    """The crop (HU) averaged onto its 3 mm grid and windowed, float32, same axis order.

    The package resamples to 1.5 mm, median-filters 3x3x3 and resamples to 3 mm. Averaging the
    working voxels straight onto the 3 mm grid (each 3 mm voxel the overlap-weighted mean of the
    working voxels it covers) removes the same noise without the median, which costs 2 to 5 s
    per scan on two cores at 1.5 mm. Measured with everything else equal: Dice 0.967 (this) vs
    0.960 (the package's steps) on 3D-IRCADb-01 patient 1 against its manual mask, 0.960 vs
    0.960 on the TotalSegmentator example against its liver label.
    """
    taps_1, taps_2 = grid.area_weights(1), grid.area_weights(2)
    planes = [
        _apply_taps(_apply_taps(crop_hu[start : start + _CHUNK], 2, *taps_2), 1, *taps_1)
        for start in range(0, crop_hu.shape[0], _CHUNK)
    ]
    return window(_apply_taps(np.concatenate(planes, axis=0), 0, *grid.area_weights(0)))


def window(hu: np.ndarray) -> np.ndarray:
    """``clip(HU / 1000, -0.2, 0.2) * 2.5``, in place on float32 input."""
    hu /= HU_SCALE
    np.clip(hu, -WINDOW_CLIP, WINDOW_CLIP, out=hu)
    hu *= WINDOW_GAIN
    return hu


@dataclass(frozen=True)
class Tile:
    """One network input: output voxels ``start[a] : start[a] + size[a]`` of the 3 mm crop."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    def input_patch(self, image: np.ndarray) -> np.ndarray:
        """The input (output region plus 13 voxels of context each side), zeros outside ``image``."""
        shape = [n + 2 * CONTEXT for n in self.size]
        patch = np.zeros(shape, dtype=np.float32)
        source, target = [], []
        for axis in range(3):
            low = self.start[axis] - CONTEXT
            first, last = max(low, 0), min(low + shape[axis], image.shape[axis])
            source.append(slice(first, max(last, first)))
            target.append(slice(first - low, max(last, first) - low))
        patch[tuple(target)] = image[tuple(source)]
        return patch

    def inside(self, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(slices into the crop, slices into the output) of the output voxels that lie in the crop."""
        crop, output = [], []
        for axis in range(3):
            first = max(self.start[axis], 0)
            last = min(self.start[axis] + self.size[axis], shape[axis])
            crop.append(slice(first, last))
            output.append(slice(first - self.start[axis], last - self.start[axis]))
        return tuple(crop), tuple(output)


def tiles(shape: Sequence[int]) -> list[Tile]:
    """Tiles of the trained size (163 x 136 x 136 output voxels) covering a 3 mm crop of ``shape``.

    An axis that fits gets one tile centred on the crop, the rest zero padding, exactly as the
    package places its crop in the patch. The network normalises each layer over the whole patch,
    so the amount of padding is part of what it was trained on: tiles cut to the body's size
    (less padding) lowered Dice on both real cases (3D-IRCADb 0.967 -> 0.949, TotalSegmentator
    example 0.960 -> 0.949). Longer axes get evenly spread tiles sharing at least
    ``TILE_OVERLAP`` voxels.
    """
    per_axis: list[list[int]] = []
    for n, size in zip(shape, TRAINED_OUTPUT, strict=True):
        if n <= size:
            per_axis.append([n // 2 - size // 2])
        else:
            count = math.ceil((n - size) / (size - TILE_OVERLAP)) + 1
            per_axis.append([int(start) for start in np.linspace(0, n - size, count).round()])
    return [Tile((x, y, z), TRAINED_OUTPUT) for x in per_axis[0] for y in per_axis[1] for z in per_axis[2]]


def postprocess(probability: np.ndarray) -> np.ndarray:
    """The package's clean-up at 3 mm: > 0.5, erode, largest 6-connected component, dilate."""
    eroded = ndimage.binary_erosion(probability > PROBABILITY_THRESHOLD, _MORPHOLOGY)
    labels, count = ndimage.label(eroded, _COMPONENTS)
    if count == 0:
        return eroded
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_dilation(labels == int(np.argmax(sizes)), _MORPHOLOGY)
