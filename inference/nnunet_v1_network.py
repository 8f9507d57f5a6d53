"""The name liverfat 0.1.0 wrote into converted nnU-Net v1 models' ``plans.json``.

Models imported by ``liverfat models import-v1`` before the backends moved to
:mod:`liverfat.inference.models` name their network ``liverfat.inference.nnunet_v1_network.V1CompatibleUNet``;
nnunetv2 locates it by that dotted name, so it must keep resolving.
"""

from liverfat.inference.models.nnunet_v1_network import V1CompatibleUNet

__all__ = ["V1CompatibleUNet"]
