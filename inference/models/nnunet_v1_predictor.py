"""nnU-Net v1's inference, run through nnunetv2 on a model converted by :mod:`liverfat.inference.models.nnunet_v1`.

A converted v1 model loads into nnunetv2 unchanged (its network is
:class:`~liverfat.inference.models.nnunet_v1_network.V1CompatibleUNet`), but nnunetv2 2.8 does three
things differently from nnU-Net v1.7.1's ``nnUNet_predict``, and each changes masks:

1. **Order of preprocessing.** v1 resamples the CT to the model's spacing *then* clips and
   normalises it; v2 normalises first. On inputs that need resampling a quarter of the voxels
   differed in a test.
2. **What is averaged.** v1 averages *softmax probabilities* over mirrored passes and
   overlapping tiles (weighted by its Gaussian, and unweighted when the image is one tile);
   v2 averages logits.
3. **Precision.** v1 accumulates tiles in float32; nnunetv2 2.8.1 accumulates in float16.

:class:`V1Predictor` is an ``nnUNetPredictor`` that overrides only the methods involved:
``predict_single_npy_array`` (v1's crop -> transpose -> resample -> normalise, and v1's export:
resample the probabilities to the input grid with v1's rule for separate-z resampling, argmax,
undo the crop, then the model's ``postprocessing.json`` as ``nnUNet_predict`` applies it),
``_internal_predict_sliding_window_return_logits`` and ``_internal_maybe_mirror_and_predict``.
Fold ensembling, padding and tile positions are nnunetv2's, which match v1's. Nothing in
nnunetv2 is patched: other v2 models keep nnunetv2's own behaviour.

:func:`seed_largest_component` is the seed's own post-processing of nnU-Net's output
(``liver_seg_curated_into_top1_mask.ipynb``), applied by the backend after the liver label is
selected.

References
----------
nnU-Net 1.7.1: ``nnunet/inference/predict.py::predict_cases``,
``network_architecture/neural_network.py::_internal_predict_3D_3Dconv_tiled``,
``preprocessing/preprocessing.py::GenericPreprocessor.resample_and_normalize``,
``inference/segmentation_export.py::save_segmentation_nifti_from_softmax``,
``postprocessing/connected_components.py``. The seed: johnnydfci/DL-parenchymal,
``test_scripts/image_postprocessing_test.py::get_biggst_mask_array``.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.resampling.default_resampling import (
    compute_new_shape,
    get_do_separate_z,
    get_lowres_axis,
    resample_data_or_seg,
)
from scipy import ndimage

logger = logging.getLogger(__name__)

V1_PLANS_KEY = "liverfat_nnunet_v1"
"""The ``plans.json`` entry that marks a converted v1 model and says how to run it."""
V1_PLANS_FORMAT = 1

GAUSSIAN_SIGMA_SCALE = 1.0 / 8
"""v1's tile weighting: a Gaussian with sigma = 1/8 of the patch size, peak 1."""
V1_MIRROR_PASSES: tuple[tuple[int, ...], ...] = ((), (2,), (1,), (2, 1), (0,), (0, 2), (0, 1), (0, 1, 2))
"""Spatial axes flipped in each test-time mirroring pass, in v1's order (the sum depends on it)."""
SEED_MIN_FRACTION = 0.03
"""The seed keeps a component only if it has more voxels than 3 % of the sum of the label image."""
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity, skimage.measure.label's default in 3-D (the seed's)."""


@dataclass(frozen=True)
class V1Inference:
    """How a converted v1 model runs, as recorded in ``plans.json`` under :data:`V1_PLANS_KEY`.

    Attributes
    ----------
    postprocessing_classes
        v1's ``postprocessing.json`` ``for_which_classes``: for each entry (a class, or a list of
        classes treated as one region) keep only the largest 6-connected component. Empty when
        the v1 model folder had no ``postprocessing.json`` (``nnUNet_predict`` then skips it).
    min_valid_object_sizes
        v1's ``min_valid_object_sizes``: per entry, only smaller components are removed (mm^3).
    seed_largest_component
        Whether the seed's own largest-component step (:func:`seed_largest_component`) follows.
    """

    postprocessing_classes: tuple[int | tuple[int, ...], ...] = ()
    min_valid_object_sizes: tuple[tuple[int | tuple[int, ...], float], ...] | None = None
    seed_largest_component: bool = True

    @classmethod
    def from_plans(cls, plans: Mapping[str, Any]) -> V1Inference | None:
        """The settings of a converted v1 model, or ``None`` for any other nnU-Net v2 model."""
        entry = plans.get(V1_PLANS_KEY)
        if entry is None:
            return None
        if entry.get("format") != V1_PLANS_FORMAT:
            raise ValueError(f"{V1_PLANS_KEY} format {entry.get('format')!r} is not {V1_PLANS_FORMAT}")
        sizes = entry.get("min_valid_object_sizes")
        return cls(
            postprocessing_classes=tuple(_region(c) for c in entry.get("postprocessing_classes", [])),
            min_valid_object_sizes=None if sizes is None else tuple((_region(c), float(s)) for c, s in sizes),
            seed_largest_component=bool(entry.get("seed_largest_component", True)),
        )

    @classmethod
    def from_v1_postprocessing(cls, content: Mapping[str, Any] | None) -> V1Inference:
        """Settings from a v1 ``postprocessing.json`` (``None``: there was none)."""
        if content is None:
            return cls()
        classes = tuple(_region(c) for c in content.get("for_which_classes", []))
        raw = content.get("min_valid_object_sizes")
        parsed = ast.literal_eval(raw) if isinstance(raw, str) else raw
        sizes = None if parsed is None else tuple((_region(c), float(s)) for c, s in dict(parsed).items())
        return cls(postprocessing_classes=classes, min_valid_object_sizes=sizes)

    def to_json(self) -> dict[str, Any]:
        def plain(region: int | tuple[int, ...]) -> int | list[int]:
            return list(region) if isinstance(region, tuple) else region

        return {
            "format": V1_PLANS_FORMAT,
            "postprocessing_classes": [plain(c) for c in self.postprocessing_classes],
            "min_valid_object_sizes": None
            if self.min_valid_object_sizes is None
            else [[plain(c), s] for c, s in self.min_valid_object_sizes],
            "seed_largest_component": self.seed_largest_component,
        }


def _region(value: Any) -> int | tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)


@dataclass(frozen=True)
class _Geometry:
    """What v1 records while preprocessing, to put the prediction back on the input grid."""

    shape_before_cropping: tuple[int, ...]
    bbox: list[list[int]]
    original_spacing: tuple[float, ...]

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(high - low for low, high in self.bbox)


class V1Predictor(nnUNetPredictor):
    """An ``nnUNetPredictor`` that computes what nnU-Net v1's ``nnUNet_predict`` computes.

    Build it like ``nnUNetPredictor`` plus the model's :class:`V1Inference`, then
    ``initialize_from_trained_model_folder``. Only ``predict_single_npy_array`` (in memory, no
    cascade, no probability export) is supported.
    """

    def __init__(self, inference: V1Inference, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.v1_inference = inference

    def predict_single_npy_array(
        self,
        input_image: np.ndarray,
        image_properties: dict[str, Any],
        segmentation_previous_stage: np.ndarray | None = None,
        output_file_truncated: str | None = None,
        save_or_return_probabilities: bool = False,
    ) -> np.ndarray:
        """v1's label map for one image ``[c, z, y, x]`` with ``{'spacing': [sz, sy, sx]}``."""
        if segmentation_previous_stage is not None or output_file_truncated is not None or save_or_return_probabilities:
            raise ValueError("a converted nnU-Net v1 model predicts in memory only: no cascade, file or probabilities")
        data, geometry = self._preprocess_v1(input_image, image_properties["spacing"])
        probabilities = self.predict_logits_from_preprocessed_data(torch.from_numpy(data)).numpy()
        labels = self._export_v1(probabilities, geometry)
        return remove_all_but_largest_regions(
            labels,
            self.v1_inference.postprocessing_classes,
            float(np.prod(geometry.original_spacing, dtype=np.float64)),
            self.v1_inference.min_valid_object_sizes,
        )

    def _preprocess_v1(self, image: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, _Geometry]:
        """Crop to the non-zero box, transpose, resample to the model's spacing, then normalise (v1's order)."""
        data = np.array(image, dtype=np.float32)  # a copy: normalisation below works in place
        shape_before_cropping = tuple(int(s) for s in data.shape[1:])
        data, _, bbox = crop_to_nonzero(data)
        transpose = self.plans_manager.transpose_forward
        data = data.transpose([0, *[axis + 1 for axis in transpose]])
        original_spacing = [float(spacing[axis]) for axis in transpose]
        target_spacing = self.configuration_manager.spacing
        data[np.isnan(data)] = 0
        new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)
        logger.debug(
            "v1 preprocessing: cropped %s at %s mm, resampled to %s at %s mm",
            data.shape[1:], original_spacing, tuple(new_shape), target_spacing,
        )  # fmt: skip
        data = self.configuration_manager.resampling_fn_data(data, new_shape, original_spacing, target_spacing)
        for channel in range(data.shape[0]):
            properties = self.plans_manager.foreground_intensity_properties_per_channel[str(channel)]
            _normalise_ct_v1(data[channel], properties)
        geometry = _Geometry(shape_before_cropping, bbox, tuple(float(s) for s in spacing))
        return np.ascontiguousarray(data, dtype=np.float32), geometry

    def _export_v1(self, probabilities: np.ndarray, geometry: _Geometry) -> np.ndarray:
        """v1's ``save_segmentation_nifti_from_softmax``: probabilities back to the input grid, argmax, uncrop."""
        probabilities = probabilities.transpose([0, *[axis + 1 for axis in self.plans_manager.transpose_backward]])
        target_shape = geometry.cropped_shape
        if probabilities.shape[1:] != target_shape:
            kwargs = self.configuration_manager.configuration["resampling_fn_probabilities_kwargs"]
            separate_z, axis = v1_export_separate_z(
                geometry.original_spacing, self.configuration_manager.spacing, kwargs.get("force_separate_z")
            )
            probabilities = resample_data_or_seg(
                probabilities,
                target_shape,
                is_seg=False,
                axis=axis,
                order=int(kwargs.get("order", 1)),
                do_separate_z=separate_z,
                order_z=int(kwargs.get("order_z", 0)),
            )
        segmentation = probabilities.argmax(0)
        labels = np.zeros(geometry.shape_before_cropping, dtype=np.uint8)
        labels[tuple(slice(low, high) for low, high in geometry.bbox)] = segmentation
        return labels

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(
        self, data: torch.Tensor, slicers: Sequence[tuple[slice, ...]], do_on_device: bool = True
    ) -> torch.Tensor:
        """Softmax probabilities averaged over tiles in float32, Gaussian-weighted only when there are several."""
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        patch_size = tuple(int(s) for s in self.configuration_manager.patch_size)
        n_classes = self.label_manager.num_segmentation_heads
        weighted = self.use_gaussian and len(slicers) > 1
        tile_weight = (
            torch.tensor(v1_gaussian(patch_size), device=results_device)
            if weighted
            else torch.ones(patch_size, dtype=torch.float32, device=results_device)
        )
        probabilities = torch.zeros((n_classes, *data.shape[1:]), dtype=torch.float32, device=results_device)
        weights = torch.zeros(data.shape[1:], dtype=torch.float32, device=results_device)
        for slicer in slicers:
            tile = data[slicer][None].to(self.device)
            prediction = self._internal_maybe_mirror_and_predict(tile)[0].to(results_device)
            if weighted:
                prediction *= tile_weight
            probabilities[slicer] += prediction
            weights[slicer[1:]] += tile_weight
        probabilities /= weights
        return probabilities

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the softmax over v1's mirrored passes, summed in v1's order with v1's 1/n factor."""
        mirror_axes = tuple(self.allowed_mirroring_axes or ()) if self.use_mirroring else ()
        n_results = 2 ** len(mirror_axes)
        result = torch.zeros(
            (x.shape[0], self.label_manager.num_segmentation_heads, *x.shape[2:]), dtype=torch.float32, device=x.device
        )
        for axes in V1_MIRROR_PASSES:
            if set(axes) <= set(mirror_axes):
                dims = [axis + 2 for axis in axes]
                probabilities = torch.softmax(self.network(torch.flip(x, dims)), 1)
                result += 1 / n_results * torch.flip(probabilities, dims)
        return result


def _normalise_ct_v1(channel: np.ndarray, properties: Mapping[str, float]) -> None:
    """v1's ``CT`` scheme in place, in float32: clip to the training percentiles, subtract the mean, divide by the SD."""
    np.clip(channel, properties["percentile_00_5"], properties["percentile_99_5"], out=channel)
    channel -= properties["mean"]
    channel /= properties["std"]


@lru_cache(maxsize=2)
def v1_gaussian(patch_size: tuple[int, ...]) -> np.ndarray:
    """v1's tile weights (``SegmentationNetwork._get_gaussian``): float32, peak 1, no zeros."""
    impulse = np.zeros(patch_size)
    impulse[tuple(size // 2 for size in patch_size)] = 1
    gaussian = ndimage.gaussian_filter(
        impulse, [size * GAUSSIAN_SIGMA_SCALE for size in patch_size], 0, mode="constant", cval=0
    )
    gaussian = (gaussian / np.max(gaussian) * 1).astype(np.float32)
    gaussian[gaussian == 0] = np.min(gaussian[gaussian != 0])
    gaussian.flags.writeable = False
    return gaussian


def v1_export_separate_z(
    original_spacing: Sequence[float], model_spacing: Sequence[float], force_separate_z: bool | None
) -> tuple[bool, int | None]:
    """Whether v1's export resamples the low-resolution axis separately, and which axis.

    v1 looks at the input's spacing first, then at the model's (``spacing_after_resampling``,
    in the model's axis order even when ``transpose_forward`` is not the identity, as v1 does).
    """
    if force_separate_z is None:
        if get_do_separate_z(original_spacing):
            separate_z, axes = True, get_lowres_axis(original_spacing)
        elif get_do_separate_z(model_spacing):
            separate_z, axes = True, get_lowres_axis(model_spacing)
        else:
            separate_z, axes = False, None
    else:
        separate_z = bool(force_separate_z)
        axes = get_lowres_axis(original_spacing) if separate_z else None
    if axes is None or len(axes) != 1:
        return False, None
    return separate_z, int(axes[0]) if separate_z else None


def remove_all_but_largest_regions(
    labels: np.ndarray,
    for_which_classes: Sequence[int | tuple[int, ...]],
    volume_per_voxel: float,
    min_valid_object_sizes: Sequence[tuple[int | tuple[int, ...], float]] | None = None,
) -> np.ndarray:
    """v1's ``postprocessing.json`` step: per entry keep the largest 6-connected component(s).

    Every component as large as the largest is kept (v1 compares sizes with ``!=``); with
    ``min_valid_object_sizes`` only components smaller than the entry's size are removed.
    """
    minimum = None if min_valid_object_sizes is None else dict(min_valid_object_sizes)
    result = labels.copy()
    for entry in for_which_classes:
        region = np.isin(result, entry if isinstance(entry, tuple) else (entry,))
        components, count = ndimage.label(region)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:] * volume_per_voxel
        remove = sizes != sizes.max()
        if minimum is not None:
            remove &= sizes < minimum[entry]
        result[np.isin(components, np.flatnonzero(remove) + 1) & region] = 0
    return result


def seed_largest_component(mask: np.ndarray) -> np.ndarray:
    """The seed's post-processing of nnU-Net's liver mask: keep its largest 26-connected component.

    As ``get_biggst_mask_array`` does it: components are numbered in raster order; a component
    replaces the kept one when it has strictly more voxels than the kept one, starting from a
    threshold of 3 % of the *sum of the component numbers* over the image. So ties keep the
    first component, and when no component passes the threshold (many small pieces) the mask is
    returned unchanged.
    """
    components, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    threshold = float(components.sum(dtype=np.int64)) * SEED_MIN_FRACTION
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    kept = 0
    for component in range(1, count + 1):
        if sizes[component] > threshold:
            kept, threshold = component, float(sizes[component])
    return np.asarray(mask, dtype=bool) if kept == 0 else components == kept
