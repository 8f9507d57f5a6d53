"""nnU-Net v1 itself, as the reference for liverfat's import of v1 models (run in a subprocess).

``python -m tests.inference.nnunet_v1_reference RESULTS_FOLDER INPUT_FOLDER OUTPUT_FOLDER`` builds
small randomly initialised v1 models with nnU-Net v1's own code (``nnunet==1.7.1``:
``nnUNetTrainerV2``, ``Generic_UNet``, ``save_checkpoint``, ``DatasetAnalyzer`` statistics) in
the v1 layout ``RESULTS_FOLDER/nnUNet/3d_fullres/<task>/nnUNetTrainerV2__nnUNetPlansv2.1/``
(``plans.pkl``, ``postprocessing.json``, ``fold_1/model_final_checkpoint.model`` + ``.pkl``),
then segments every ``*_0000.nii.gz`` in INPUT_FOLDER with v1's own ``predict_from_folder``
(as ``nnUNet_predict -t 521 -m 3d_fullres -f 1`` does) into OUTPUT_FOLDER.

It runs in its own process because v1 reads ``nnUNet_raw_data_base``, ``nnUNet_preprocessed``
and ``RESULTS_FOLDER`` when imported, prints freely, and loads its checkpoints with torch's
unsafe ``torch.load`` (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``): the caller sets those
variables for this process only.

The plans follow v1's ``ExperimentPlanner3D_v21`` for the seed's data, shrunk: two stages
(3d_lowres, 3d_fullres = stage 1), 0.7 x 0.7 x 2.5 mm, first kernels ``[1, 3, 3]``, 4 base
features, patch 8 x 32 x 32. The weights are v1's He initialisation except the output layer,
which makes the random network call about half of the image liver, so that the masks have many
boundary voxels (and voxels near a 50 % probability) to disagree on.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

SEED_TASK = "Task521_liver"
OTHER_TASK = "Task003_Liver"
TRAINER_FOLDER = "nnUNetTrainerV2__nnUNetPlansv2.1"
FOLD = 1
PATCH_SIZE = (8, 32, 32)
SPACING = (2.5, 0.7, 0.7)
BASE_FEATURES = 4
OUTPUT_WEIGHT_SCALE = 4.0
TRAINING_HU_SD = 60.0
POSTPROCESSING = {
    # what v1's determine_postprocessing writes when keeping the largest foreground region helped
    "dc_per_class_raw": {"1": 0.95},
    "dc_per_class_pp_all": {"1": 0.96},
    "dc_per_class_pp_per_class": {},
    "for_which_classes": [[1]],
    "min_valid_object_sizes": "None",
    "num_samples": 64,
    "validation_raw": "validation_raw",
    "validation_final": "validation_final",
}


def trainer_folder(results: Path, task: str) -> Path:
    return results / "nnUNet" / "3d_fullres" / task / TRAINER_FOLDER


def intensity_properties() -> OrderedDict[int, OrderedDict[str, object]]:
    """v1's own statistics (``DatasetAnalyzer._compute_stats``) over foreground voxels, float32 as in v1."""
    from nnunet.experiment_planning.DatasetAnalyzer import DatasetAnalyzer

    voxels = list(np.random.default_rng(11).normal(60.0, TRAINING_HU_SD, 5000).astype(np.float32))
    median, mean, sd, mn, mx, p99_5, p00_5 = DatasetAnalyzer._compute_stats(voxels)
    stats: OrderedDict[str, object] = OrderedDict(
        local_props=OrderedDict(),
        median=median,
        mean=mean,
        sd=sd,
        mn=mn,
        mx=mx,
        percentile_99_5=p99_5,
        percentile_00_5=p00_5,
    )
    return OrderedDict([(0, stats)])


def plans(task: str, num_classes: int, preprocessed: Path) -> dict[str, object]:
    """A v1 plans dict (``nnUNetPlansv2.1_plans_3D.pkl``) in ExperimentPlanner3D_v21's format."""
    stage = {
        "batch_size": 2,
        "do_dummy_2D_data_aug": False,
        "pool_op_kernel_sizes": [[1, 2, 2], [2, 2, 2]],
        "conv_kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    }
    lowres = dict(
        stage,
        num_pool_per_axis=[1, 2, 2],
        patch_size=np.array(PATCH_SIZE),
        median_patient_size_in_voxels=np.array([10, 40, 40]),
        current_spacing=np.array([2.5, 1.4, 1.4]),
        original_spacing=np.array(SPACING),
    )
    fullres = dict(
        stage,
        num_pool_per_axis=[1, 2, 2],
        patch_size=np.array(PATCH_SIZE),
        median_patient_size_in_voxels=np.array([12, 64, 64]),
        current_spacing=np.array(SPACING),
        original_spacing=np.array(SPACING),
    )
    properties = intensity_properties()
    return {
        "num_stages": 2,
        "num_modalities": 1,
        "modalities": {0: "CT"},
        "normalization_schemes": OrderedDict([(0, "CT")]),
        "dataset_properties": {
            "all_sizes": [(12, 64, 64)],
            "all_spacings": [np.array(SPACING)],
            "all_classes": list(range(1, num_classes + 1)),
            "modalities": {0: "CT"},
            "intensityproperties": properties,
            "size_reductions": OrderedDict([("case_000", 1.0)]),
        },
        "list_of_npz_files": [str(preprocessed / "nnUNetData_plans_v2.1_stage1" / "case_000.npz")],
        "original_spacings": [np.array(SPACING)],
        "original_sizes": [np.array([12, 64, 64])],
        "preprocessed_data_folder": str(preprocessed),
        "num_classes": num_classes,
        "all_classes": list(range(1, num_classes + 1)),
        "base_num_features": BASE_FEATURES,
        "use_mask_for_norm": OrderedDict([(0, False)]),
        "keep_only_largest_region": None,
        "min_region_size_per_class": None,
        "min_size_per_class": None,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "data_identifier": "nnUNetData_plans_v2.1",
        "plans_per_stage": {0: lowres, 1: fullres},
        "preprocessor_name": "GenericPreprocessor",
        "conv_per_stage": 2,
    }


def build_model(results: Path, preprocessed: Path, task: str, num_classes: int, seed: int) -> Path:
    """Plans, postprocessing.json and fold 1's final checkpoint, saved by v1's own code."""
    from batchgenerators.utilities.file_and_folder_operations import save_json, write_pickle
    from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2

    folder = trainer_folder(results, task)
    folder.mkdir(parents=True, exist_ok=True)
    dataset_directory = preprocessed / task
    dataset_directory.mkdir(parents=True, exist_ok=True)
    plans_file = dataset_directory / "nnUNetPlansv2.1_plans_3D.pkl"
    write_pickle(plans(task, num_classes, preprocessed), str(plans_file))
    write_pickle(plans(task, num_classes, preprocessed), str(folder / "plans.pkl"))
    save_json(POSTPROCESSING, str(folder / "postprocessing.json"))

    torch.manual_seed(seed)
    trainer = nnUNetTrainerV2(
        str(plans_file), FOLD, output_folder=str(folder), dataset_directory=str(dataset_directory),
        batch_dice=True, stage=1, unpack_data=True, deterministic=True, fp16=False,
    )
    trainer.initialize(training=False)
    with torch.no_grad():
        for head in trainer.network.seg_outputs:
            # liver logit minus background logit: a zero-mean random mix of the features, so that
            # the random network calls about half of the image liver
            mix = torch.randn(head.weight.shape[1])
            head.weight[0] = 0.0
            head.weight[1] = ((mix - mix.mean()) * OUTPUT_WEIGHT_SCALE).view(-1, 1, 1, 1)
    # what training leaves in a checkpoint: numpy scalars in the loss curves and best values
    trainer.epoch = 0
    trainer.all_tr_losses = [np.float64(-0.8)]
    trainer.all_val_losses = [np.float64(-0.7)]
    trainer.all_val_eval_metrics = [np.float64(0.93)]
    trainer.best_epoch_based_on_MA_tr_loss = 0
    trainer.best_MA_tr_loss_for_patience = np.float64(-0.81)
    trainer.best_val_eval_criterion_MA = np.float64(0.94)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "model_final_checkpoint.model"))
    return folder


def main(results: Path, inputs: Path, outputs: Path) -> None:
    from nnunet.inference.predict import predict_from_folder

    preprocessed = results.parent / "preprocessed"
    seed_model = build_model(results, preprocessed, SEED_TASK, num_classes=1, seed=0)
    build_model(results, preprocessed, OTHER_TASK, num_classes=2, seed=1)
    predict_from_folder(
        str(seed_model), str(inputs), str(outputs), folds=(FOLD,), save_npz=False,
        num_threads_preprocessing=1, num_threads_nifti_save=1, lowres_segmentations=None,
        part_id=0, num_parts=1, tta=True, mixed_precision=True, overwrite_existing=True,
        mode="normal", overwrite_all_in_gpu=None, step_size=0.5, checkpoint_name="model_final_checkpoint",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
