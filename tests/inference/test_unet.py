"""The liver U-Net in torch against a float64 numpy implementation of the Keras model's maths.

The reference below is written from ``create_unet_like_model`` (pyliverlesionseg 0.3,
``architectures/unet_generalized.py``) layer by layer: concatenation, full tensors, nearest
upsampling followed by a 3x3x3 average pool, and the normalisation as the Keras Lambda writes it.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.unet import (
    ALL_SPECS,
    PARAMETER_COUNT,
    TRAINED_INPUT,
    TRAINED_OUTPUT,
    LiverUNet,
    keras_instance_norm_,
    linear_upsample,
    load_keras_weights,
)

# ---------------------------------------------------------------------------------------------
# float64 numpy reference, channels first: arrays are (C, x, y, z)


def np_conv_same(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras Conv3D(padding='same'), stride 1, odd kernels; weight (out, in, kx, ky, kz)."""
    kx, ky, kz = weight.shape[2:]
    padded = np.pad(x, ((0, 0), (kx // 2, kx // 2), (ky // 2, ky // 2), (kz // 2, kz // 2)))
    nx, ny, nz = x.shape[1:]
    out = np.zeros((weight.shape[0], nx, ny, nz))
    for a in range(kx):
        for b in range(ky):
            for c in range(kz):
                window = padded[:, a : a + nx, b : b + ny, c : c + nz]
                out += np.tensordot(weight[:, :, a, b, c], window, axes=([1], [0]))
    return out + bias[:, None, None, None]


def np_norm_act(x: np.ndarray) -> np.ndarray:
    """Lambda (x - mean) / (std + K.epsilon()) over the spatial axes, then LeakyReLU(0.01)."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)  # population std, as K.std
    y = (x - mean) / (std + 1e-7)
    return np.where(y > 0, y, 0.01 * y)


def np_max_pool3(x: np.ndarray) -> np.ndarray:
    c, nx, ny, nz = x.shape
    return x.reshape(c, nx // 3, 3, ny // 3, 3, nz // 3, 3).max(axis=(2, 4, 6))


def np_nearest_then_average(x: np.ndarray) -> np.ndarray:
    """UpSampling3D(3) followed by AveragePooling3D(3, strides=1, padding='valid')."""
    up = x.repeat(3, axis=1).repeat(3, axis=2).repeat(3, axis=3)
    nx, ny, nz = (n - 2 for n in up.shape[1:])
    total = np.zeros((x.shape[0], nx, ny, nz))
    for a in range(3):
        for b in range(3):
            for c in range(3):
                total += up[:, a : a + nx, b : b + ny, c : c + nz]
    return total / 27.0


def np_centre_crop(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    offsets = [(n - m) // 2 for n, m in zip(x.shape[1:], shape, strict=True)]
    (a, b, c), (na, nb, nc) = offsets, shape
    return x[:, a : a + na, b : b + nb, c : c + nc]


def np_unet(x: np.ndarray, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The Keras graph for the liver model (4 levels, pool 3, 'same', linear upsampling)."""

    def conv(name: str, t: np.ndarray) -> np.ndarray:
        return np_conv_same(t, *weights[name])

    h = conv("conv3d_1", x)  # no normalisation or activation before the first convolution
    left = [conv("conv3d_2", np_norm_act(h))]
    for first, second in (("conv3d_3", "conv3d_4"), ("conv3d_5", "conv3d_6"), ("conv3d_7", "conv3d_8")):
        h = np_max_pool3(left[-1])
        left.append(conv(second, np_norm_act(conv(first, np_norm_act(h)))))
    h = left.pop()
    for first, second in (("conv3d_9", "conv3d_10"), ("conv3d_11", "conv3d_12"), ("conv3d_13", "conv3d_14")):
        up = np_nearest_then_average(h)
        h = np.concatenate([np_centre_crop(left.pop(), up.shape[1:]), up], axis=0)
        h = conv(second, np_norm_act(conv(first, np_norm_act(h))))
    return 1.0 / (1.0 + np.exp(-conv("conv3d_15", np_norm_act(h))))


# ---------------------------------------------------------------------------------------------


def _random_model(seed: int, slab_bytes: int) -> LiverUNet:
    """Default-initialised weights (small), biases spread; slabs of ``slab_bytes``, blocks of 2.5 slabs."""
    torch.manual_seed(seed)
    model = LiverUNet(slab_bytes=slab_bytes, block_bytes=5 * slab_bytes // 2).eval()
    with torch.no_grad():
        for conv in model.layers_by_keras_name().values():
            conv.bias.uniform_(-0.1, 0.1)  # type: ignore[union-attr]
    return model


def _numpy_weights(model: LiverUNet) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        name: (conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy())  # type: ignore[union-attr]
        for name, conv in model.layers_by_keras_name().items()
    }


def test_forward_matches_the_float64_reference_of_the_keras_graph() -> None:
    # Small random weights and input; distinct sizes per axis; tiny slabs and blocks so the
    # streamed full-resolution code runs through many slab and block boundaries.
    model = _random_model(seed=3, slab_bytes=2**16)
    rng = np.random.default_rng(5)
    image = rng.uniform(-0.5, 0.5, size=(1, 54, 81, 54))

    with torch.inference_mode():
        got = model(torch.from_numpy(image).float()[None])[0].double().numpy()
    expected = np_unet(image, _numpy_weights(model))

    assert got.shape == expected.shape == (1, 28, 55, 28)
    assert np.abs(got - expected).max() < 2e-5
    assert expected.std() > 0.01  # the comparison is not between two constants


def test_streamed_forward_equals_the_plain_torch_graph_at_the_trained_size_ratio() -> None:
    model = _random_model(seed=4, slab_bytes=2**18)
    x = torch.rand(1, 1, 54, 81, 54) - 0.5
    with torch.inference_mode():
        streamed = model(x)
        plain = _plain_torch(model, x)
    assert torch.allclose(streamed, plain, atol=1e-5)


def test_bfloat16_forward_is_as_close_to_float32_as_torch_autocast() -> None:
    # bf16 weights, activations and storage with float32 statistics, against torch's autocast (bf16
    # convolutions, float32 elsewhere). Random weights amplify rounding through 15 layers (mean error
    # about a tenth of the output's spread for both); the pretrained network keeps Dice >= 0.999
    # (test_precision.py). Measured: mean error 0.0083 (bf16) vs 0.0062 (autocast).
    model = _random_model(seed=3, slab_bytes=2**16)
    x = torch.from_numpy(np.random.default_rng(5).uniform(-0.5, 0.5, size=(1, 1, 54, 81, 54))).float()
    with torch.inference_mode():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x)
        reduced = model.to_precision(torch.bfloat16)(x)

    assert reduced.dtype == torch.float32 and model.down_pairs[0].first.weight.dtype == torch.bfloat16
    error = (reduced.float() - reference).abs()
    assert error.mean() < 2.0 * (autocast.float() - reference).abs().mean()
    assert error.max() < 0.2


def _plain_torch(model: LiverUNet, x: torch.Tensor) -> torch.Tensor:
    def norm_act(t: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(t, dim=(2, 3, 4), correction=0, keepdim=True)
        return F.leaky_relu((t - mean) / (var.sqrt() + 1e-7), 0.01)

    skips = []
    h = x
    for level, pair in enumerate(model.down_pairs):
        h = pair.second(norm_act(pair.first(h if level == 0 else norm_act(F.max_pool3d(h, 3)))))
        skips.append(h)
    h = skips.pop()
    for pair in model.up_pairs:
        up = F.avg_pool3d(F.interpolate(h, scale_factor=3, mode="nearest"), 3, stride=1)
        skip = skips.pop()
        a, b, c = ((n - m) // 2 for n, m in zip(skip.shape[2:], up.shape[2:], strict=True))
        skip = skip[:, :, a : a + up.shape[2], b : b + up.shape[3], c : c + up.shape[4]]
        h = pair.second(norm_act(pair.first(norm_act(torch.cat([skip, up], dim=1)))))
    return torch.sigmoid(model.final(norm_act(h)))


def test_instance_norm_is_the_keras_formula_not_torch_instance_norm() -> None:
    # std 1e-3: the epsilon outside the square root (Keras) and inside it (torch) then differ by 5 %
    values = np.random.default_rng(1).normal(0.0, 1e-3, size=(1, 4, 6, 5, 7))
    x = torch.from_numpy(values).float().contiguous(memory_format=torch.channels_last_3d)

    got = keras_instance_norm_(x.clone(memory_format=torch.channels_last_3d)).double().numpy()
    mean = values.mean(axis=(2, 3, 4), keepdims=True)
    expected = (values - mean) / (values.std(axis=(2, 3, 4), keepdims=True) + 1e-7)

    assert np.abs(got - expected).max() < 1e-4
    torch_norm = F.instance_norm(x.contiguous(), eps=1e-7).double().numpy()
    assert np.abs(torch_norm - expected).max() > 0.05


def test_instance_norm_of_many_chunks_matches_float64() -> None:
    # 135,000 voxels: two whole chunks of statistics and a partial one; rows not a multiple
    # of the multiply-add's tile; an offset of 50 standard deviations and a trend along x, so the
    # chunks' means differ and a one-pass sum of squares in float32 would lose the variance
    rng = np.random.default_rng(8)
    trend = np.linspace(-3.0, 3.0, 60)[None, None, :, None, None]
    values = 50.0 + trend + rng.normal(0.0, 1.0, size=(1, 3, 60, 50, 45))
    x = torch.from_numpy(values).float().contiguous(memory_format=torch.channels_last_3d)

    got = keras_instance_norm_(x).double().numpy()
    mean = values.mean(axis=(2, 3, 4), keepdims=True)
    expected = (values - mean) / (values.std(axis=(2, 3, 4), keepdims=True) + 1e-7)

    assert np.abs(got - expected).max() < 2e-5


def test_instance_norm_refuses_a_layout_it_cannot_update_in_place() -> None:
    with pytest.raises(ValueError, match="channels-last"):
        keras_instance_norm_(torch.zeros(1, 3, 4, 5, 6))


def test_linear_upsample_equals_nearest_then_average_pool() -> None:
    values = np.random.default_rng(2).normal(size=(2, 4, 5, 3))
    got = linear_upsample(torch.from_numpy(values)[None].contiguous(memory_format=torch.channels_last_3d))
    assert got.shape == (1, 2, 10, 13, 7)
    assert np.allclose(got[0].numpy(), np_nearest_then_average(values), atol=1e-12)


def test_output_size_follows_the_27k_minus_26_rule() -> None:
    assert LiverUNet.output_size(TRAINED_INPUT) == TRAINED_OUTPUT
    with pytest.raises(ValueError, match="multiples of 27"):
        LiverUNet.output_size((190, 162, 162))


def test_forward_is_deterministic() -> None:
    model = _random_model(seed=6, slab_bytes=2**18)
    x = torch.rand(1, 1, 54, 27, 54)
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))


def _write_keras_file(path: Path, kernels: dict[str, np.ndarray], biases: dict[str, np.ndarray]) -> None:
    """An HDF5 file laid out as Keras 2.2's ``save_weights``: group/name/name/kernel:0."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode() for name in kernels])
        for name, kernel in kernels.items():
            group = f.create_group(name)
            group.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()])
            group.create_dataset(f"{name}/kernel:0", data=kernel)
            group.create_dataset(f"{name}/bias:0", data=biases[name])


def test_keras_kernels_load_with_axes_moved_to_torch_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    kernels = {
        s.name: rng.normal(size=(*s.kernel, s.in_channels, s.out_channels)).astype(np.float32) for s in ALL_SPECS
    }
    biases = {s.name: rng.normal(size=s.out_channels).astype(np.float32) for s in ALL_SPECS}
    path = tmp_path / "keras.hdf5"
    _write_keras_file(path, kernels, biases)

    model = LiverUNet()
    load_keras_weights(model, path)

    for name, conv in model.layers_by_keras_name().items():
        # torch (out, in, kx, ky, kz) <- Keras (kx, ky, kz, in, out)
        assert np.array_equal(conv.weight.detach().numpy(), kernels[name].transpose(4, 3, 0, 1, 2))
        assert np.array_equal(conv.bias.detach().numpy(), biases[name])  # type: ignore[union-attr]


def test_a_weight_file_of_another_network_is_refused(tmp_path: Path) -> None:
    kernels = {s.name: np.zeros((*s.kernel, s.in_channels, s.out_channels), np.float32) for s in ALL_SPECS}
    biases = {s.name: np.zeros(s.out_channels, np.float32) for s in ALL_SPECS}
    kernels["conv3d_9"] = np.zeros((3, 3, 3, 160, 160), np.float32)  # not the 320-channel concatenation
    path = tmp_path / "other.hdf5"
    _write_keras_file(path, kernels, biases)

    with pytest.raises(LiverfatError, match="conv3d_9") as raised:
        load_keras_weights(LiverUNet(), path)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE


def test_a_file_that_is_not_hdf5_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.hdf5"
    path.write_bytes(b"plain text")
    with pytest.raises(LiverfatError, match="cannot read") as raised:
        load_keras_weights(LiverUNet(), path)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE


def test_pretrained_weights_fill_every_layer_of_the_documented_network(default_weights: Path) -> None:
    model = LiverUNet()
    load_keras_weights(model, default_weights)

    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNT
    with h5py.File(default_weights, "r") as f:
        stored = np.asarray(f["conv3d_13/conv3d_13/kernel:0"])
        names = [n.decode() for n in f.attrs["layer_names"] if n.startswith(b"conv3d_")]
    assert sorted(names) == sorted(s.name for s in ALL_SPECS)
    conv13 = model.layers_by_keras_name()["conv3d_13"]
    assert np.array_equal(conv13.weight.detach().numpy().transpose(2, 3, 4, 1, 0), stored)
