"""The nnU-Net options a model folder is run with, and their defaults (importable without nnunetv2)."""

NNUNET_CHECKPOINT_FINAL = "checkpoint_final.pth"
NNUNET_CHECKPOINT_BEST = "checkpoint_best.pth"
NNUNET_CHECKPOINT_CHOICES: tuple[str, ...] = (NNUNET_CHECKPOINT_FINAL, NNUNET_CHECKPOINT_BEST)
NNUNET_DEFAULT_TILE_STEP_SIZE = 0.5
"""nnU-Net's own default: sliding-window tiles overlap by half a tile."""

ORIENTATION_AUTO = "auto"
ORIENTATION_LPS = "LPS"
ORIENTATION_RAS = "RAS"
NNUNET_ORIENTATIONS: tuple[str, ...] = (ORIENTATION_AUTO, ORIENTATION_LPS, ORIENTATION_RAS)
"""Voxel order an nnU-Net model was trained on; ``auto`` follows the reader in its plans."""
