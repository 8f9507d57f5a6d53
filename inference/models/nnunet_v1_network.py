"""nnU-Net v1's ``Generic_UNet`` as a ``dynamic_network_architectures`` network that nnunetv2 can build.

nnU-Net v1 and v2 build the same plain U-Net (strided-conv encoder, transposed-conv decoder,
conv -> instance norm -> LeakyReLU blocks) with one difference: the kernel size of the
decoder's convolutions. Decoder stage ``u`` (0 = the one right above the bottleneck) uses

- in v1 (``Generic_UNet``): ``conv_kernel_sizes[-(u + 1)]``,
- in v2 (``UNetDecoder``): ``kernel_sizes[-(u + 2)]``, the kernel of the encoder stage it merges with.

For isotropic plans both give 3x3x3 everywhere. For anisotropic plans such as the seed's
(0.7 x 0.7 x 2.5 mm, first kernels ``[1, 3, 3]``) they differ, and a stock ``PlainConvUNet``
cannot load a v1 model's weights. :class:`V1CompatibleUNet` is that ``PlainConvUNet`` with the
decoder rebuilt on v1's indexing; nnunetv2 finds it by the dotted name
:data:`V1_NETWORK_CLASS_NAME` in ``plans.json`` (``pydoc.locate``).
"""

from __future__ import annotations

from typing import Any

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn

V1_NETWORK_CLASS_NAME = "liverfat.inference.models.nnunet_v1_network.V1CompatibleUNet"
"""The dotted name nnunetv2 locates this class by (``architecture.network_class_name``)."""


class V1CompatibleUNet(PlainConvUNet):
    """``PlainConvUNet`` whose decoder stage ``u`` uses nnU-Net v1's kernel ``kernel_sizes[-(u + 1)]``.

    Takes exactly ``PlainConvUNet``'s arguments; the state-dict keys are ``PlainConvUNet``'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        encoder = self.encoder
        features = encoder.output_channels
        self.decoder.stages = nn.ModuleList(
            StackedConvBlocks(
                len(stage.convs),
                encoder.conv_op,
                2 * features[-(u + 2)],
                features[-(u + 2)],
                encoder.kernel_sizes[-(u + 1)],
                1,
                encoder.conv_bias,
                encoder.norm_op,
                encoder.norm_op_kwargs,
                encoder.dropout_op,
                encoder.dropout_op_kwargs,
                encoder.nonlin,
                encoder.nonlin_kwargs,
                kwargs.get("nonlin_first", False),
            )
            for u, stage in enumerate(self.decoder.stages)
        )
