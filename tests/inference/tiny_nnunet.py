"""A tiny nnU-Net v2 trained-model folder, built and saved with nnU-Net's own code.

``plans.json`` follows nnU-Net v2's ExperimentPlanner format (a 2-stage PlainConvUNet without
normalisation layers, CT normalisation, nnU-Net's default resampling); the network is
instantiated by ``nnUNetTrainer.build_network_architecture`` exactly as the predictor will
rebuild it, and the checkpoint carries the keys ``nnUNetTrainer.save_checkpoint`` writes.

The weights are set by hand so the prediction is known in advance: one path carries the
CT-normalised intensity ``h = (HU - threshold_hu) / 50`` through two LeakyReLUs to the output
head, every other weight is zero. Logits are 0 for background, ``h + liver_bias`` for the liver
label and ``-h`` for every other foreground label, so the liver is exactly where
HU > ``threshold_hu`` (shifted by ``shift_voxels`` along the network's last axis when asked).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer"
PLANS_NAME = "nnUNetPlans"
INTENSITY_STD_HU = 50.0
MODEL_SPACING_ZYX = (2.5, 1.4, 1.4)
PATCH_SIZE_ZYX = (32, 64, 64)
FEATURES = (4, 8)


@dataclass(frozen=True)
class TinyFold:
    """Weights of one fold: a bias added to the liver logit, and a shift of the output in voxels."""

    liver_bias: float = 0.0
    shift_voxels: int = 0


@dataclass(frozen=True)
class TinyModel:
    labels: Mapping[str, int] = field(default_factory=lambda: {"background": 0, "spleen": 1, "liver": 2})
    liver_label: str = "liver"
    threshold_hu: float = 70.0
    folds: Mapping[int | str, TinyFold] = field(default_factory=lambda: {0: TinyFold()})
    checkpoint_name: str = "checkpoint_final.pth"
    reader_writer: str = "SimpleITKIO"
    dataset_name: str = "Dataset901_TinyLiver"


def plans_for(model: TinyModel) -> dict[str, object]:
    return {
        "dataset_name": model.dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": [2.5, 0.7, 0.7],
        "original_median_shape_after_transp": [24, 128, 128],
        "image_reader_writer": model.reader_writer,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3000.0,
                "mean": model.threshold_hu,
                "median": model.threshold_hu,
                "min": -1024.0,
                "percentile_00_5": -1024.0,
                "percentile_99_5": 3000.0,
                "std": INTENSITY_STD_HU,
            }
        },
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(PATCH_SIZE_ZYX),
                "median_image_size_in_voxels": [24, 64, 64],
                "spacing": list(MODEL_SPACING_ZYX),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": 2,
                        "features_per_stage": list(FEATURES),
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
                        "strides": [[1, 1, 1], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1],
                        "n_conv_per_stage_decoder": [1],
                        "conv_bias": True,
                        "norm_op": None,
                        "norm_op_kwargs": None,
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": None,
                        "nonlin_kwargs": None,
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
    }


def dataset_json_for(model: TinyModel) -> dict[str, object]:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(model.labels),
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": model.dataset_name,
    }


def write_tiny_model(folder: Path, model: TinyModel = TinyModel()) -> Path:
    """Write ``dataset.json``, ``plans.json`` and ``fold_X/<checkpoint>`` for every fold; return ``folder``."""
    plans = plans_for(model)
    dataset_json = dataset_json_for(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    for fold, weights in model.folds.items():
        network = _network(plans, dataset_json, model, weights)
        checkpoint = {
            "network_weights": network.state_dict(),
            "optimizer_state": None,
            "grad_scaler_state": None,
            "logging": {},
            "_best_ema": None,
            "current_epoch": 1,
            "init_args": {
                "plans": plans,
                "configuration": CONFIGURATION,
                "fold": fold,
                "dataset_json": dataset_json,
                "device": torch.device("cpu"),
            },
            "trainer_name": TRAINER,
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, folder / f"fold_{fold}" / model.checkpoint_name)
    return folder


def _network(
    plans: dict[str, object], dataset_json: dict[str, object], model: TinyModel, weights: TinyFold
) -> torch.nn.Module:
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    n_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration, 1, n_outputs, enable_deep_supervision=False
    )
    liver = model.labels[model.liver_label]
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        first = network.encoder.stages[0][0].convs[0].conv
        first.weight[0, 0, 1, 1, 1] = 1.0
        decoder = network.decoder.stages[0].convs[0].conv
        skip_channel = FEATURES[0]  # the decoder concatenates [upsampled, skip]
        decoder.weight[0, skip_channel, 1, 1, 1 + weights.shift_voxels] = 1.0
        head = network.decoder.seg_layers[0]
        for label in range(1, n_outputs):
            head.weight[label, 0, 0, 0, 0] = 1.0 if label == liver else -1.0
        head.bias[liver] = weights.liver_bias
    return network
