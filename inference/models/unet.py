"""The whole-liver 3-D U-Net of pyliverlesionseg 0.3, in PyTorch, and its Keras weights.

The network (Tang et al., EJNMMI 2020) was built with ``create_unet_like_model`` of that package
(``architectures/unet_generalized.py``) with pooling factors 3/9/27, 'same' padding,
``upsampling='linear'`` and instance normalisation. Read from that code and checked against the
layer names and shapes stored in the weight file:

- four levels; features per level down 20/40, 40/80, 80/160, 160/160 and up 40/20, 80/40, 160/80;
  kernels (3, 3, 1) then (3, 3, 3) down, (3, 3, 3) then (3, 3, 1) up, 'same' zero padding;
- every convolution except the very first is preceded by a non-affine instance normalisation
  ``(x - mean) / (std + 1e-7)`` (population std over the spatial axes, per channel; torch's
  ``instance_norm`` puts the epsilon under the square root instead) and LeakyReLU(0.01);
- max pooling 3; upsampling = nearest x3 followed by a 3x3x3 average pool, stride 1, 'valid',
  so a level of n voxels comes back as 3n - 2; the skip is centre-cropped to match and the
  concatenation order is [skip, upsampled];
- a 1x1x1 convolution with a sigmoid gives the liver probability; 3,874,961 parameters.

The Keras model is channels-last with spatial axes (x, y, z) in RAS order; this module keeps the
spatial order and uses torch's channels-last-3d memory layout, so tensors are ``(1, C, x, y, z)``.
An input of 27k voxels along an axis gives 27k - 26 outputs, the output voxel ``o`` lying over input
voxel ``o + 13`` (189 x 162 x 162 in, 163 x 136 x 136 out is the size the model was trained at).

Memory. A 189 x 162 x 162 patch has 5 M voxels per channel, so one 40-channel full-resolution tensor
is 0.8 GB, and the plain graph peaks near 3 GB. ``forward`` computes the same arithmetic (the tests
compare it with a float64 implementation of the plain graph) without that: it never builds a
concatenation (the weight is split by input channel instead), holds full-resolution tensors as
blocks of rows along x (``_Rows``) that a convolution, run slab by slab, releases once it has read
them for the last time, never builds the first layer's output or the upsampled branch (their rows
are computed when a slab needs them; their normalisation statistics exactly, from the one-channel
input's moments and from the coarse tensor), and keeps the level-1 down output only pooled and
cropped. The peak is about one 40-channel output-sized tensor (0.5 GB) plus slabs: a forward pass
adds about 0.9 GB to the process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liverfat.errors import LiverfatError, Reason

logger = logging.getLogger(__name__)

LEAKY_SLOPE = 0.01
KERAS_EPSILON = 1e-7  # keras.backend.epsilon()
POOL = 3
LEVELS = 4
SIZE_MULTIPLE = POOL ** (LEVELS - 1)  # 27: input sizes the three poolings divide evenly
CONTEXT = 13  # input voxels on each side of the output: 27k in, 27k - 26 out
TRAINED_INPUT = (189, 162, 162)  # (x, y, z) voxels at 3 mm
TRAINED_OUTPUT = (163, 136, 136)
PARAMETER_COUNT = 3_874_961
SLAB_BYTES = 32 * 2**20  # full-resolution convolution output computed at once
BLOCK_BYTES = 64 * 2**20  # storage blocks of full-resolution tensors (see _Rows)
_STATS_CHUNK_VOXELS = 2**19  # input voxels per step when gathering the first layer's statistics
_CHUNK_ROWS = 2**16  # rows of a (voxels, channels) view whose statistics are taken at once (in L3)
_TILE = 16  # rows multiplied as one in _scale_shift_
STATS_DTYPE = torch.float32  # normalisation statistics, whatever the activations' dtype


@dataclass(frozen=True)
class ConvSpec:
    """One Conv3D layer of the Keras model: its layer name, channels and kernel (x, y, z)."""

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int, int]


_IN_PLANE = (3, 3, 1)
_CUBE = (3, 3, 3)
# Down path per level (first conv, second conv), then up path per level from the bottom.
DOWN_SPECS: tuple[tuple[ConvSpec, ConvSpec], ...] = (
    (ConvSpec("conv3d_1", 1, 20, _IN_PLANE), ConvSpec("conv3d_2", 20, 40, _CUBE)),
    (ConvSpec("conv3d_3", 40, 40, _IN_PLANE), ConvSpec("conv3d_4", 40, 80, _CUBE)),
    (ConvSpec("conv3d_5", 80, 80, _IN_PLANE), ConvSpec("conv3d_6", 80, 160, _CUBE)),
    (ConvSpec("conv3d_7", 160, 160, _CUBE), ConvSpec("conv3d_8", 160, 160, _CUBE)),
)
UP_SPECS: tuple[tuple[ConvSpec, ConvSpec], ...] = (  # levels 3, 2, 1
    (ConvSpec("conv3d_9", 320, 160, _CUBE), ConvSpec("conv3d_10", 160, 80, _IN_PLANE)),
    (ConvSpec("conv3d_11", 160, 80, _CUBE), ConvSpec("conv3d_12", 80, 40, _IN_PLANE)),
    (ConvSpec("conv3d_13", 80, 40, _CUBE), ConvSpec("conv3d_14", 40, 20, _IN_PLANE)),
)
FINAL_SPEC = ConvSpec("conv3d_15", 20, 1, (1, 1, 1))
ALL_SPECS: tuple[ConvSpec, ...] = (
    *(spec for pair in DOWN_SPECS for spec in pair),
    *(spec for pair in UP_SPECS for spec in pair),
    FINAL_SPEC,
)


def _conv_layer(spec: ConvSpec) -> nn.Conv3d:
    return nn.Conv3d(spec.in_channels, spec.out_channels, spec.kernel, padding="same")


class _ConvPair(nn.Module):
    """The two convolutions of one level on one side of the U."""

    def __init__(self, first: ConvSpec, second: ConvSpec) -> None:
        super().__init__()
        self.first = _conv_layer(first)
        self.second = _conv_layer(second)


def keras_instance_norm_(x: Tensor) -> Tensor:
    """In place: ``(x - mean) / (std + 1e-7)`` per channel over the spatial axes (batch of one)."""
    _normalise_([x])
    return x


def _voxel_rows(x: Tensor) -> Tensor:
    """The ``(voxels, channels)`` view of a channels-last ``(1, C, x, y, z)`` tensor (same storage).

    torch reduces this view over its rows many times faster than the tensor over its spatial axes.
    """
    if x.shape[0] != 1 or not x.is_contiguous(memory_format=torch.channels_last_3d):
        raise ValueError(f"expected one channels-last sample, got shape {tuple(x.shape)} strides {x.stride()}")
    return x.permute(0, 2, 3, 4, 1).view(-1, x.shape[1])


def _normalise_(slabs: Sequence[Tensor], activate: bool = False) -> None:
    """The Keras normalisation (then LeakyReLU) of a tensor held as slabs, in place.

    The data is read twice, once for the statistics and once to normalise it. Each chunk's mean
    and sum of squared deviations from that mean are computed in float32 while the chunk is
    cached (so the deviations are taken from the chunk's own mean, as in a two-pass computation)
    and combined exactly in float64: the total sum of squares is the chunks' sums plus each
    chunk's count times the square of its mean's distance to the overall mean.
    """
    views = [_voxel_rows(slab) for slab in slabs]
    # One buffer for every chunk's float32 copy and deviations: a fresh 10 MB tensor per chunk is
    # a new mapping whose pages fault in each time (3x the arithmetic in bfloat16).
    rows = min(_CHUNK_ROWS, max(view.shape[0] for view in views))
    buffer = torch.empty((rows, views[0].shape[1]), dtype=STATS_DTYPE, device=views[0].device)
    counts, means, squares = [], [], []
    for view in views:
        for chunk in view.split(_CHUNK_ROWS):
            part = buffer[: chunk.shape[0]]
            values = chunk if chunk.dtype == STATS_DTYPE else part.copy_(chunk)
            mean = values.sum(dim=0).div_(values.shape[0])
            counts.append(values.shape[0])
            means.append(mean)
            squares.append(torch.sub(values, mean, out=part).square_().sum(dim=0))
    count = torch.tensor(counts, dtype=torch.float64, device=views[0].device)[:, None]
    chunk_means = torch.stack(means).double()
    mean = (count * chunk_means).sum(dim=0) / count.sum()
    spread = torch.stack(squares).double().sum(dim=0) + (count * (chunk_means - mean).square()).sum(dim=0)
    inverse = (spread / count.sum()).sqrt_().add_(KERAS_EPSILON).reciprocal_()
    shift = (-mean * inverse).to(views[0].dtype)
    for view in views:
        _scale_shift_(view, inverse.to(views[0].dtype), shift, activate)


def _scale_shift_(view: Tensor, scale: Tensor, shift: Tensor, activate: bool = True) -> None:
    """``view * scale + shift`` per channel of a ``(voxels, channels)`` view, then LeakyReLU, in place.

    ``_TILE`` rows at a time are viewed as one row (the per-channel vectors repeated), so that a
    row fills whole vector registers whatever the channel count (bfloat16 twice as fast).
    """
    whole = view.shape[0] // _TILE * _TILE
    tiled = view[:whole].view(-1, _TILE * view.shape[1])
    for part, part_scale, part_shift in (
        (tiled, scale.repeat(_TILE), shift.repeat(_TILE)),
        (view[whole:], scale, shift),
    ):
        torch.addcmul(part_shift, part, part_scale, out=part)
        if activate:
            F.leaky_relu_(part, LEAKY_SLOPE)


def _norm_act(x: Tensor) -> Tensor:
    """Normalisation then LeakyReLU (in place when ``x`` is channels-last)."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    _normalise_([x], activate=True)
    return x


def linear_upsample(x: Tensor) -> Tensor:
    """Nearest x3 then a 3x3x3 average pool (stride 1, valid): n voxels become 3n - 2 (channels-last out).

    Along each axis output ``m`` averages input voxels ``m // 3``, ``(m + 1) // 3`` and
    ``(m + 2) // 3``, which is linear interpolation at ``m / 3``; both operations are separable,
    so this is exactly trilinear interpolation with aligned corners (computed without the 3n-voxel
    intermediate).
    """
    size = [3 * n - 2 for n in x.shape[2:]]
    return F.interpolate(x, size=size, mode="trilinear", align_corners=True).contiguous(
        memory_format=torch.channels_last_3d
    )


def _centre_crop(x: Tensor, size: Sequence[int]) -> Tensor:
    offsets = [(n - m) // 2 for n, m in zip(x.shape[2:], size, strict=True)]
    return x[
        :,
        :,
        offsets[0] : offsets[0] + size[0],
        offsets[1] : offsets[1] + size[1],
        offsets[2] : offsets[2] + size[2],
    ]


class LiverUNet(nn.Module):
    """The pyliverlesionseg 0.3 liver U-Net; input ``(1, 1, x, y, z)``, sizes multiples of 27.

    ``slab_bytes`` bounds the full-resolution convolution output computed at once and
    ``block_bytes`` the blocks full-resolution tensors are stored in (memory only; the result
    does not depend on them).
    """

    def __init__(self, slab_bytes: int = SLAB_BYTES, block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__()
        self.slab_bytes = slab_bytes
        self.block_bytes = block_bytes
        self.down = nn.ModuleList(_ConvPair(*pair) for pair in DOWN_SPECS)
        self.up = nn.ModuleList(_ConvPair(*pair) for pair in UP_SPECS)
        self.final = _conv_layer(FINAL_SPEC)

    @property
    def down_pairs(self) -> list[_ConvPair]:
        return [cast(_ConvPair, pair) for pair in self.down]

    @property
    def up_pairs(self) -> list[_ConvPair]:
        return [cast(_ConvPair, pair) for pair in self.up]

    def layers_by_keras_name(self) -> dict[str, nn.Conv3d]:
        convs = [conv for pair in (*self.down_pairs, *self.up_pairs) for conv in (pair.first, pair.second)]
        return {spec.name: conv for spec, conv in zip(ALL_SPECS, [*convs, self.final], strict=True)}

    def to_precision(self, dtype: torch.dtype) -> LiverUNet:
        """Run in ``dtype`` (the convolutions' weights, activations and storage), in place.

        The final 1x1x1 convolution and its sigmoid stay float32 (20 multiply-adds a voxel): the
        probability is thresholded at 0.5, where bfloat16's steps are 2**-9 wide. Normalisation
        statistics are float32 or float64 whatever the dtype (``_normalise_``).
        """
        self.to(dtype)
        self.final.float()
        return self

    @staticmethod
    def output_size(input_size: Sequence[int]) -> tuple[int, int, int]:
        """Output voxels (x, y, z) for an input of ``input_size``; raises ValueError if invalid."""
        if len(input_size) != 3 or any(n <= 0 or n % SIZE_MULTIPLE for n in input_size):
            raise ValueError(f"input size {tuple(input_size)} must be three positive multiples of {SIZE_MULTIPLE}")
        return (input_size[0] - 2 * CONTEXT, input_size[1] - 2 * CONTEXT, input_size[2] - 2 * CONTEXT)

    def forward(self, x: Tensor) -> Tensor:
        """Liver probability ``(1, 1, x - 26, y - 26, z - 26)`` for a windowed CT patch."""
        out_size = self.output_size(x.shape[2:])
        top, *lower = self.down_pairs

        # level 1, down, streamed: the first layer's rows are computed as the second convolution
        # needs them, and its 40-channel output is kept only pooled and, cropped, as the skip
        first_layer = _FirstLayerRows(x, top.first)
        skip = _Rows(out_size[0], self.block_bytes)
        pooled = []
        for start, slab in self._slabs(top.second, [first_layer], x.shape[2], multiple=POOL):
            pooled.append(F.max_pool3d(slab, POOL))
            low, high = max(start, CONTEXT), min(start + slab.shape[2], CONTEXT + out_size[0])
            if low < high:
                crop = slab[:, :, low - start : high - start, CONTEXT : CONTEXT + out_size[1]]
                skip.append(crop[..., CONTEXT : CONTEXT + out_size[2]])
        del first_layer

        # levels 2 to 4, down, and 3 to 2, up: a 27th of the voxels and less, the plain graph
        skips = []
        h_low = torch.cat(pooled, dim=2).contiguous(memory_format=torch.channels_last_3d)
        del pooled
        for level, pair in enumerate(lower, start=2):
            h_low = pair.second(_norm_act(pair.first(_norm_act(h_low))))
            if level < LEVELS:
                skips.append(h_low)
                h_low = F.max_pool3d(h_low, POOL)
        *middle, outer = self.up_pairs
        for pair in middle:
            up = linear_upsample(h_low)
            cropped = _centre_crop(skips.pop(), up.shape[2:]).clone(memory_format=torch.channels_last_3d)
            h_low = pair.second(_norm_act(_conv_parts([_norm_act(cropped), _norm_act(up)], pair.first)))
            del cropped, up

        # level 1, up, streamed: input rows are released as the output grows
        skip.normalise_()
        upsampled = _UpsampledRows(h_low)
        h = self._stream(outer.first, [skip, upsampled], out_size[0])
        del skip, upsampled
        h.normalise_()
        h = self._stream(outer.second, [h], out_size[0])
        h.normalise_()
        return torch.cat([torch.sigmoid(self.final(slab.to(self.final.weight.dtype))) for slab in h.slabs()], dim=2)

    def _slabs(
        self, conv: nn.Conv3d, sources: Sequence[_RowSource], size_x: int, multiple: int = 1
    ) -> Iterator[tuple[int, Tensor]]:
        """``(first row, output slab)`` of ``conv`` over the channel concatenation of ``sources``.

        Slab lengths are multiples of ``multiple``; after each slab the sources drop the rows no
        later slab reads.
        """
        rows = self.slab_bytes // (conv.out_channels * conv.weight.element_size() * sources[0].plane_voxels)
        length = max(multiple, rows // multiple * multiple)
        half = conv.kernel_size[0] // 2
        for start in range(0, size_x, length):
            stop = min(start + length, size_x)
            yield start, _conv_parts([s.rows(start - half, stop + half) for s in sources], conv, x_padded=True)
            for source in sources:
                source.release_below(stop - half)

    def _stream(self, conv: nn.Conv3d, sources: Sequence[_RowSource], size_x: int) -> _Rows:
        result = _Rows(size_x, self.block_bytes)
        for _, slab in self._slabs(conv, sources, size_x):
            result.append(slab)
        return result


class _RowSource(Protocol):
    """Rows (along x) of a full-resolution ``(1, C, x, y, z)`` tensor, zero outside its extent."""

    @property
    def plane_voxels(self) -> int: ...

    def rows(self, first: int, stop: int) -> Tensor: ...

    def release_below(self, row: int) -> None: ...


class _Rows:
    """A channels-last ``(1, C, x, y, z)`` tensor held as blocks of rows along x.

    Slabs are copied into blocks of about ``block_bytes`` as they arrive, and a streamed
    convolution releases each block once it has read its rows for the last time, so a
    full-resolution level never holds its input and its output whole at the same time. Blocks
    are few and large (each its own mapping, returned to the system when released), while the
    small per-slab temporaries reuse the same memory from one slab to the next.
    """

    def __init__(self, size_x: int, block_bytes: int) -> None:
        self.size_x = size_x
        self.block_bytes = block_bytes
        self._blocks: list[tuple[int, Tensor]] = []  # (first row, block), consecutive
        self._filled = 0
        self._released = 0

    def append(self, slab: Tensor) -> None:
        """Copy ``slab`` (the next rows) in, opening blocks as needed."""
        copied = 0
        while copied < slab.shape[2]:
            start, block = self._open_block(slab)
            offset = self._filled - start
            count = min(block.shape[2] - offset, slab.shape[2] - copied)
            block[:, :, offset : offset + count] = slab[:, :, copied : copied + count]
            copied += count
            self._filled += count

    def _open_block(self, like: Tensor) -> tuple[int, Tensor]:
        if self._blocks:
            start, block = self._blocks[-1]
            if self._filled < start + block.shape[2]:
                return start, block
        row_bytes = like.shape[1] * like.shape[3] * like.shape[4] * like.element_size()
        rows = min(max(1, self.block_bytes // row_bytes), self.size_x - self._filled)
        shape = (1, like.shape[1], rows, like.shape[3], like.shape[4])
        block = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last_3d)
        self._blocks.append((self._filled, block))
        return self._blocks[-1]

    def slabs(self) -> list[Tensor]:
        """The blocks, in order (the rows held; all of them unless some were released)."""
        return [block for _, block in self._blocks]

    @property
    def plane_voxels(self) -> int:
        block = self._blocks[0][1]
        return int(block.shape[3] * block.shape[4])

    def normalise_(self) -> None:
        """Keras normalisation and LeakyReLU over the whole tensor, in place."""
        if self._filled != self.size_x or self._released:
            raise ValueError(f"rows {self._released}:{self._filled} of {self.size_x} held; need all to normalise")
        _normalise_(self.slabs(), activate=True)

    def rows(self, first: int, stop: int) -> Tensor:
        if max(first, 0) < self._released or min(stop, self.size_x) > self._filled:
            raise ValueError(f"rows {first}:{stop} requested, rows {self._released}:{self._filled} held")
        pieces = [self._zero_rows(-first)] if first < 0 else []
        for start, block in self._blocks:
            low, high = max(first, start), min(stop, start + block.shape[2])
            if low < high:
                pieces.append(block[:, :, low - start : high - start])
        if stop > self.size_x:
            pieces.append(self._zero_rows(stop - self.size_x))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def release_below(self, row: int) -> None:
        """Drop the blocks that hold only rows before ``row``."""
        while self._blocks and self._blocks[0][0] + self._blocks[0][1].shape[2] <= row:
            start, block = self._blocks.pop(0)
            self._released = start + block.shape[2]

    def _zero_rows(self, count: int) -> Tensor:
        like = self._blocks[0][1]
        shape = (1, like.shape[1], count, like.shape[3], like.shape[4])
        return torch.zeros(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=torch.channels_last_3d)


class _FirstLayerRows:
    """Rows of the first convolution's output, normalised and activated, computed when asked for.

    The first convolution reads a single channel, so the mean and variance of its output follow
    exactly from the input's first and second moments over the kernel's taps (a taps x taps
    matrix), gathered slab by slab in float64; the 20-channel output is never stored whole.
    """

    def __init__(self, image: Tensor, conv: nn.Conv3d) -> None:
        if image.shape[:2] != (1, 1) or conv.in_channels != 1:
            raise ValueError(f"expected a one-channel input and convolution, got {tuple(image.shape)}")
        self.image = image.contiguous(memory_format=torch.channels_last_3d)
        self.conv = conv
        self.size_x = image.shape[2]
        mean, std = _first_layer_stats(self.image, conv)
        inverse = 1.0 / (std + KERAS_EPSILON)
        self.shift, self.inverse = (-mean * inverse).to(conv.weight.dtype), inverse.to(conv.weight.dtype)

    @property
    def plane_voxels(self) -> int:
        return int(self.image.shape[3] * self.image.shape[4])

    def rows(self, first: int, stop: int) -> Tensor:
        low, high = max(first, 0), min(stop, self.size_x)
        half = self.conv.kernel_size[0] // 2
        piece = self.image[:, :, max(low - half, 0) : min(high + half, self.size_x)]
        piece = F.pad(piece, (0, 0, 0, 0, max(half - low, 0), max(high + half - self.size_x, 0)))
        values = _conv_parts([piece], self.conv, x_padded=True)
        _scale_shift_(_voxel_rows(values), self.inverse, self.shift)
        if first < 0 or stop > self.size_x:
            values = F.pad(values, (0, 0, 0, 0, low - first, stop - high))
        return values.contiguous(memory_format=torch.channels_last_3d)

    def release_below(self, row: int) -> None:
        """Nothing to release: rows are computed from the (one-channel) input on demand."""


def _first_layer_stats(image: Tensor, conv: nn.Conv3d) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population std of ``conv(image)`` ('same' zero padding), without it.

    With taps t of the kernel, output c is ``b_c + sum_t w_ct x_t``; its sum needs the sums of the
    shifted inputs x_t and its sum of squares their cross products, all over the output voxels.
    """
    kernel = conv.kernel_size
    halves = [k // 2 for k in kernel]
    padded = F.pad(image[0, 0], (halves[2], halves[2], halves[1], halves[1], halves[0], halves[0]))
    nx, ny, nz = image.shape[2:]
    taps = [(a, b, c) for a in range(kernel[0]) for b in range(kernel[1]) for c in range(kernel[2])]
    sums = torch.zeros(len(taps), dtype=torch.float64, device=image.device)
    products = torch.zeros(len(taps), len(taps), dtype=torch.float64, device=image.device)
    step = max(1, _STATS_CHUNK_VOXELS // (ny * nz))
    for start in range(0, nx, step):
        stop = min(start + step, nx)
        shifted = torch.stack(
            [padded[start + a : stop + a, b : b + ny, c : c + nz].reshape(-1) for a, b, c in taps]
        ).double()
        sums += shifted.sum(dim=1)
        products += shifted @ shifted.T
    weight = conv.weight.detach()[:, 0].reshape(conv.out_channels, len(taps)).double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(weight[:, 0])
    count = float(nx * ny * nz)
    linear = weight @ sums
    total = count * bias + linear
    quadratic = torch.einsum("ct,tu,cu->c", weight, products, weight)
    total_squares = count * bias.square() + 2.0 * bias * linear + quadratic
    mean = total / count
    std = (total_squares / count - mean.square()).clamp_(min=0.0).sqrt_()
    return mean.to(image.dtype), std.to(image.dtype)


class _UpsampledRows:
    """Rows of ``linear_upsample(coarse)``, normalised and activated, computed when asked for.

    The normalisation statistics come from ``_upsampled_stats`` (exact, without building the
    upsampled tensor); the rows themselves are interpolated from the coarse rows they cover.
    """

    def __init__(self, coarse: Tensor) -> None:
        self.coarse = coarse
        self.size_x = 3 * coarse.shape[2] - 2
        mean, std = _upsampled_stats(coarse)
        inverse = 1.0 / (std + KERAS_EPSILON)
        self.shift, self.inverse = (-mean * inverse).flatten(), inverse.flatten()

    @property
    def plane_voxels(self) -> int:
        return (3 * self.coarse.shape[3] - 2) * (3 * self.coarse.shape[4] - 2)

    def rows(self, first: int, stop: int) -> Tensor:
        low, high = max(first, 0), min(stop, self.size_x)
        coarse_first = low // POOL
        coarse_stop = min((high - 1) // POOL + 2, self.coarse.shape[2])
        piece = linear_upsample(self.coarse[:, :, coarse_first:coarse_stop])
        offset = low - coarse_first * POOL
        values = piece[:, :, offset : offset + high - low]
        _scale_shift_(_voxel_rows(values), self.inverse, self.shift)
        if first < 0 or stop > self.size_x:
            values = F.pad(values, (0, 0, 0, 0, low - first, stop - high))
        return values.contiguous(memory_format=torch.channels_last_3d)

    def release_below(self, row: int) -> None:
        """Nothing to release: rows are computed from the (small) coarse tensor on demand."""


def _conv_parts(parts: Sequence[Tensor], conv: nn.Conv3d, x_padded: bool = False) -> Tensor:
    """``conv`` over the channel concatenation of ``parts`` without building the concatenation.

    The weight is split by input channel and the partial convolutions are summed. With
    ``x_padded`` the parts already hold the kernel's halo rows along x (zeros at the ends).
    """
    half_x = 0 if x_padded else conv.kernel_size[0] // 2
    padding = (half_x, conv.kernel_size[1] // 2, conv.kernel_size[2] // 2)
    total: Tensor | None = None
    channel = 0
    for part in parts:
        weight = conv.weight[:, channel : channel + part.shape[1]]
        part = part.to(dtype=weight.dtype, memory_format=torch.channels_last_3d)
        result = F.conv3d(part, weight, conv.bias if total is None else None, padding=padding)
        total = result if total is None else total.add_(result)
        channel += part.shape[1]
    if total is None or channel != conv.in_channels:
        raise ValueError(f"parts hold {channel} channels, the convolution takes {conv.in_channels}")
    return total.contiguous(memory_format=torch.channels_last_3d)


def _interpolation_matrix(n: int) -> Tensor:
    """The ``(3n - 2, n)`` float64 matrix of ``linear_upsample`` along one axis."""
    rows = torch.arange(3 * n - 2)
    low, fraction = rows // POOL, (rows % POOL).double() / POOL
    matrix = torch.zeros(3 * n - 2, n, dtype=torch.float64)
    matrix[rows, low] = 1.0 - fraction
    inside = fraction > 0
    matrix[rows[inside], low[inside] + 1] = fraction[inside]
    return matrix


def _upsampled_stats(coarse: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population std of ``linear_upsample(coarse)`` without building it.

    Interpolation is linear and separable: with the per-axis matrices A, the sum of the
    upsampled values is the coarse tensor weighted by A's column sums, and the sum of their
    squares is the quadratic form of the coarse tensor with the per-axis Gram matrices A^T A.
    Computed in float64 on the coarse tensor (1/27 of the voxels).
    """
    values = coarse[0].to(device="cpu", dtype=torch.float64)  # (C, x, y, z)
    matrices = [_interpolation_matrix(n) for n in values.shape[1:]]
    weighted_sum = torch.einsum("cxyz,x,y,z->c", values, *(m.sum(dim=0) for m in matrices))
    gram = [m.T @ m for m in matrices]
    smoothed = torch.einsum("cxyz,xa,yb,zd->cabd", values, *gram)
    sum_of_squares = (values * smoothed).sum(dim=(1, 2, 3))
    count = float(np.prod([m.shape[0] for m in matrices]))
    mean = weighted_sum / count
    std = (sum_of_squares / count - mean.square()).clamp_(min=0.0).sqrt_()
    shape = (1, -1, 1, 1, 1)
    return (mean.to(coarse).view(shape), std.to(coarse).view(shape))


def load_keras_weights(model: LiverUNet, h5_path: Path) -> None:
    """Copy the Keras 2.2 weights (``model.save_weights`` HDF5) into ``model``.

    Keras stores a Conv3D kernel as (kx, ky, kz, in, out); torch wants (out, in, kx, ky, kz).
    Every layer's presence and shape is checked, so a different file cannot load silently.
    """
    try:
        with h5py.File(h5_path, "r") as weights:
            group = weights.get("model_weights", weights)
            for spec, conv in model.layers_by_keras_name().items():
                kernel, bias = _read_layer(group, spec)
                state_kernel = np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2))
                if state_kernel.shape != tuple(conv.weight.shape) or bias.shape != (conv.out_channels,):
                    raise LiverfatError(
                        Reason.BACKEND_UNAVAILABLE,
                        f"weight file {h5_path}: layer {spec} has kernel {kernel.shape} and bias {bias.shape}, "
                        f"expected the pyliverlesionseg 0.3 liver U-Net's {tuple(conv.weight.shape)}",
                    )
                with torch.no_grad():
                    conv.weight.copy_(torch.from_numpy(state_kernel))
                    if conv.bias is not None:
                        conv.bias.copy_(torch.from_numpy(bias))
    except (OSError, KeyError) as error:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE, f"cannot read the liver U-Net weights from {h5_path}: {error}"
        ) from error
    logger.debug("loaded %d Keras layers from %s", len(ALL_SPECS), h5_path)


def _read_layer(group: h5py.Group, name: str) -> tuple[np.ndarray, np.ndarray]:
    layer = group[name]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in layer.attrs["weight_names"]]
    arrays = {n.rsplit("/", 1)[-1].split(":")[0]: np.asarray(layer[n], dtype=np.float32) for n in names}
    return arrays["kernel"], arrays["bias"]
