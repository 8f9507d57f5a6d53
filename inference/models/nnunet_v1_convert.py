"""An nnU-Net v1 model as an nnU-Net v2 trained-model folder: plans, dataset description and weights.

:func:`write_v2_folder` writes what nnunetv2's predictor loads (``plans.json``,
``dataset.json``, ``fold_N/checkpoint_final.pth``) for a :class:`V1Model` read and checked by
:mod:`liverfat.inference.models.nnunet_v1`:

- the plans' stage gives spacing, patch size, kernels and pooling (already in the transposed
  axis order, as v2 keeps them), ``transpose_forward/backward`` carry over;
- v1's ``CT`` normalisation becomes ``CTNormalization`` with the dataset's foreground
  statistics (v1's ``sd``, ``mn``, ``mx`` are v2's ``std``, ``min``, ``max``);
- v1's resampling orders (data 3, probabilities 1, 0 along a separately resampled axis) and
  ``segmentation_export_params`` when the plans have them;
- the network is :class:`~liverfat.inference.models.nnunet_v1_network.V1CompatibleUNet`;
  ``Generic_UNet``'s weights map one to one onto its names (``conv_blocks_context`` ->
  ``encoder.stages``, the bottleneck's two blocks -> one stage, ``conv_blocks_localization`` ->
  ``decoder.stages``, ``tu`` -> ``decoder.transpconvs`` and ``seg_outputs`` ->
  ``decoder.seg_layers`` with zero biases, which v1 does not have), plus the duplicate names
  nnunetv2's state dicts carry;
- ``plans.json`` gets the :data:`~liverfat.inference.models.nnunet_v1_predictor.V1_PLANS_KEY` entry
  that makes liverfat's backend run the model with v1's inference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.nnunet_options import NNUNET_CHECKPOINT_FINAL
from liverfat.inference.models.nnunet_v1_network import V1_NETWORK_CLASS_NAME
from liverfat.inference.models.nnunet_v1_predictor import V1_PLANS_KEY, V1Inference

V1_CONFIGURATION = "3d_fullres"
V1_MAX_FEATURES_3D = 320
V1_MIRROR_AXES = (0, 1, 2)
"""v1 ``nnUNetTrainerV2`` mirrors 3-D models along every axis at test time."""
V2_TRAINER = "nnUNetTrainer"
V2_LABELS = {"background": 0, "liver": 1}


@dataclass(frozen=True)
class V1Model:
    """A v1 model as read from its files, checked to be a one-class CT ``3d_fullres`` model."""

    task: str
    configuration: str
    plans_identifier: str
    fold: int
    stage: int
    plans: Mapping[str, Any]
    batch_dice: bool
    state_dict: Mapping[str, torch.Tensor]
    epoch: int
    inference: V1Inference

    @property
    def stage_plans(self) -> Mapping[str, Any]:
        return self.plans["plans_per_stage"][self.stage]


def _architecture(model: V1Model) -> dict[str, Any]:
    """``PlainConvUNet`` arguments that rebuild v1's ``Generic_UNet`` for these plans."""
    stage = model.stage_plans
    pools = [[int(v) for v in pool] for pool in stage["pool_op_kernel_sizes"]]
    kernels = [[int(v) for v in kernel] for kernel in stage["conv_kernel_sizes"]]
    convs = int(model.plans.get("conv_per_stage", 2))
    features = [int(model.plans["base_num_features"])]
    for _ in pools:
        features.append(min(int(np.round(features[-1] * 2)), V1_MAX_FEATURES_3D))
    return {
        "network_class_name": V1_NETWORK_CLASS_NAME,
        "arch_kwargs": {
            "n_stages": len(pools) + 1,
            "features_per_stage": features,
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": kernels,
            "strides": [[1, 1, 1], *pools],
            "n_conv_per_stage": [convs] * (len(pools) + 1),
            "n_conv_per_stage_decoder": [convs] * len(pools),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.modules.activation.LeakyReLU",
            "nonlin_kwargs": {"negative_slope": 0.01, "inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _v2_plans(model: V1Model) -> dict[str, Any]:
    plans, stage = model.plans, model.stage_plans
    intensity = plans["dataset_properties"]["intensityproperties"][0]
    export = plans.get("segmentation_export_params", {})
    resampling_probabilities = {
        "is_seg": False,
        "order": int(export.get("interpolation_order", 1)),
        "order_z": int(export.get("interpolation_order_z", 0)),
        "force_separate_z": export.get("force_separate_z"),
    }
    return {
        "dataset_name": model.task,
        "plans_name": model.plans_identifier,
        "original_median_spacing_after_transp": [float(v) for v in stage["current_spacing"]],
        "original_median_shape_after_transp": [int(v) for v in stage["median_patient_size_in_voxels"]],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [int(v) for v in plans["transpose_forward"]],
        "transpose_backward": [int(v) for v in plans["transpose_backward"]],
        "configurations": {
            V1_CONFIGURATION: {
                "data_identifier": f"{plans.get('data_identifier', model.plans_identifier)}_stage{model.stage}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": int(stage["batch_size"]),
                "patch_size": [int(v) for v in stage["patch_size"]],
                "median_image_size_in_voxels": [int(v) for v in stage["median_patient_size_in_voxels"]],
                "spacing": [float(v) for v in stage["current_spacing"]],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": resampling_probabilities,
                "architecture": _architecture(model),
                "batch_dice": model.batch_dice,
            }
        },
        "experiment_planner_used": "nnU-Net v1 plans, converted by liverfat",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": float(intensity["mx"]),
                "mean": float(intensity["mean"]),
                "median": float(intensity["median"]),
                "min": float(intensity["mn"]),
                "percentile_00_5": float(intensity["percentile_00_5"]),
                "percentile_99_5": float(intensity["percentile_99_5"]),
                "std": float(intensity["sd"]),
            }
        },
        V1_PLANS_KEY: model.inference.to_json(),
    }


def _dataset_json(model: V1Model) -> dict[str, Any]:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(V2_LABELS),
        "numTraining": len(model.plans.get("list_of_npz_files", [])),
        "file_ending": ".nii.gz",
        "name": model.task,
    }


def _v1_key(name: str, n_pool: int, convs: int) -> str | None:
    """The v1 ``Generic_UNet`` key of a v2 parameter name; ``None`` for the biases v1 does not have (zero)."""
    parts = name.split(".")
    layer = {"conv": "conv", "norm": "instnorm"}

    def block(stage: int, conv: int, first_stages: int) -> str:
        if stage < first_stages:
            return f"{stage}.blocks.{conv}"
        return f"{stage}.0.blocks.{conv}" if conv < convs - 1 else f"{stage}.1.blocks.0"

    if parts[:2] == ["encoder", "stages"] and parts[3:5] == ["0", "convs"] and parts[6] in layer:
        return f"conv_blocks_context.{block(int(parts[2]), int(parts[5]), n_pool)}.{layer[parts[6]]}.{parts[7]}"
    if parts[:2] == ["decoder", "stages"] and parts[3] == "convs" and parts[5] in layer:
        return f"conv_blocks_localization.{block(int(parts[2]), int(parts[4]), 0)}.{layer[parts[5]]}.{parts[6]}"
    v1_names = {"transpconvs": "tu", "seg_layers": "seg_outputs"}
    if parts[0] == "decoder" and parts[1] in v1_names:
        return f"{v1_names[parts[1]]}.{parts[2]}.weight" if parts[3] == "weight" else None
    raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"no v1 counterpart for the network parameter {name}")


def convert_weights(state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """v1 weights as the state dict of the network nnunetv2 builds from ``architecture`` (all its keys)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    network = get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        1,
        len(V2_LABELS),
        allow_init=False,
        deep_supervision=False,
    )
    kwargs = architecture["arch_kwargs"]
    n_pool, convs = kwargs["n_stages"] - 1, kwargs["n_conv_per_stage"][0]
    used: set[str] = set()
    mismatched = []
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            source = _v1_key(name, n_pool, convs)
            if source is None:
                parameter.zero_()
            elif source not in state_dict or tuple(state_dict[source].shape) != tuple(parameter.shape):
                found = tuple(state_dict[source].shape) if source in state_dict else "absent"
                mismatched.append(f"{source} {found} for {name} {tuple(parameter.shape)}")
            else:
                parameter.copy_(state_dict[source])
                used.add(source)
    unused = sorted(set(state_dict) - used)
    if mismatched or unused:
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED,
            "the v1 weights do not fit the network its plans describe: "
            + "; ".join([*mismatched[:3], *(f"unused {key}" for key in unused[:3])]),
        )
    return dict(network.state_dict())


def write_v2_folder(model: V1Model, out: Path) -> None:
    plans = _v2_plans(model)
    dataset_json = _dataset_json(model)
    weights = convert_weights(model.state_dict, plans["configurations"][V1_CONFIGURATION]["architecture"])
    (out / f"fold_{model.fold}").mkdir(parents=True)
    (out / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    checkpoint = {
        "network_weights": weights,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": model.epoch,
        "init_args": {"plans": plans, "configuration": V1_CONFIGURATION, "fold": model.fold, "dataset_json": dataset_json},
        "trainer_name": V2_TRAINER,
        "inference_allowed_mirroring_axes": V1_MIRROR_AXES,
    }
    torch.save(checkpoint, out / f"fold_{model.fold}" / NNUNET_CHECKPOINT_FINAL)
