"""CIFAR-100 preprocessing: TFF's crops + per-image standardisation, FedJAX's pad/crop/flip."""

import numpy as np
import pytest

from fedjax_core.data import cifar100 as c


def _coordinate_images(n, size=32):
    # Pixel (i, j) of every image holds (i, j, image index): crops reveal their offsets.
    img = np.zeros((n, size, size, 3), np.int64)
    img[..., 0] = np.arange(size)[:, None]
    img[..., 1] = np.arange(size)[None, :]
    img[..., 2] = np.arange(n)[:, None, None]
    return img


def test_preprocess_client():
    image = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    out = c.preprocess_client({"image": image, "label": np.array([1, 2, 3, 99], np.int64),
                               "coarse_label": np.zeros(4, np.int64)})
    assert set(out) == {"x", "y"}
    assert out["x"] is image
    assert out["y"].dtype == np.int32 and out["y"].tolist() == [1, 2, 3, 99]


def test_standardisation_by_hand():
    # Constant image: std 0 < 1/sqrt(N), x - mean = 0 -> all zeros.
    np.testing.assert_array_equal(c.per_image_standardization(np.full((1, 4, 4, 3), 9)), 0.0)
    # Values 0 and 2: mean 1, std 1 -> -1, +1.
    got = c.per_image_standardization(np.array([0, 2]).reshape(1, 1, 2, 1))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.ravel(), [-1.0, 1.0])
    # Values 0 and 0.01: std 0.005 is below 1/sqrt(2), which is used instead.
    got = c.per_image_standardization(np.array([0.0, 0.01]).reshape(1, 2, 1, 1))
    np.testing.assert_allclose(got.ravel(), [-0.005 * 2**0.5, 0.005 * 2**0.5], rtol=1e-6)
    # Each image on its own: [0, 2] -> +-1 and [10, 14] -> +-1.
    got = c.per_image_standardization(np.array([[0, 2], [10, 14]]).reshape(2, 1, 2, 1))
    np.testing.assert_allclose(got.reshape(2, 2), [[-1, 1], [-1, 1]])


def test_center_crop_offset_is_4():
    img = _coordinate_images(2)
    crop = c.center_crop(img)
    assert crop.shape == (2, 24, 24, 3)
    assert crop[0, 0, 0, :2].tolist() == [4, 4] and crop[1, 23, 23, :2].tolist() == [27, 27]
    assert c.center_crop(img, 31, 30)[0, 0, 0, :2].tolist() == [0, 1]


def _offsets_and_flips(crops):
    # Top-left pixel gives the offset, unless the crop is flipped (columns descending).
    flipped = crops[:, 0, 0, 1] > crops[:, 0, -1, 1]
    left = np.where(flipped, crops[:, 0, -1, 1], crops[:, 0, 0, 1])
    return np.stack([crops[:, 0, 0, 0], left], 1), flipped


def test_random_crop_flip_draws_per_image():
    img = _coordinate_images(64)
    crops = c.random_crop_flip(img, np.random.default_rng(3), 24, 24)
    offsets, flipped = _offsets_and_flips(crops)
    # Each crop is a window of its own image at the decoded offset, maybe flipped.
    for k in range(64):
        window = img[k, offsets[k, 0]:offsets[k, 0] + 24, offsets[k, 1]:offsets[k, 1] + 24]
        np.testing.assert_array_equal(crops[k], window[:, ::-1] if flipped[k] else window)
    # The documented draws: offsets rng.integers(0, 9, (n, 2)), then flips rng.random(n) < .5.
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(offsets, rng.integers(0, [9, 9], size=(64, 2)))
    np.testing.assert_array_equal(flipped, rng.random(64) < 0.5)
    assert offsets.min() == 0 and offsets.max() == 8  # every window, both ends
    assert 0 < flipped.sum() < 64


def test_random_crop_flip_one_draw_for_all():
    crops = c.random_crop_flip(_coordinate_images(5), np.random.default_rng(0), 24, 24,
                               per_image=False)
    offsets, flipped = _offsets_and_flips(crops)
    assert len({tuple(o) for o in offsets}) == 1 and len(set(flipped)) == 1


def test_fedjax_pad_crop_flip_offsets_0_to_7():
    img = _coordinate_images(400) + 1  # +1 so that padding (0) is told apart
    out = c.pad_crop_flip(img, np.random.default_rng(5))
    assert out.shape == img.shape
    # A crop at (r, s) of the 4-padded image: its row 16 is original row r + 12, which
    # holds r + 13; likewise for columns once a flip is undone.
    flipped = out[:, 16, 10, 1] > out[:, 16, 20, 1]
    unflipped = np.where(flipped[:, None, None, None], out[:, :, ::-1], out)
    offs = np.stack([unflipped[:, 16, 16, 0] - 13, unflipped[:, 16, 16, 1] - 13], 1)
    assert offs.min() == 0 and offs.max() == 7  # FedJAX's np.random.randint(8): never 8
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(offs, rng.integers(0, [8, 8], size=(400, 2)))
    np.testing.assert_array_equal(flipped, rng.random(400) < 0.5)
    # Zero padding rows: 4 - r above the image, or r - 4 below it.
    pad_rows = (unflipped[:, :, 16, 0] == 0).sum(1)
    np.testing.assert_array_equal(pad_rows, np.abs(4 - offs[:, 0]))


def test_fedjax_normalize_by_hand():
    # FedJAX's own check: [125, 123, 114] -> ~0 and [177, 174, 165] -> ~1 per channel.
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[:] = [125, 123, 114]
    img[0, 0] = [177, 174, 165]
    out = c.preprocess_eval_fedjax(img)
    assert out.dtype == np.float32 and out.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(out[0, 1:], 0.0, atol=0.01)
    np.testing.assert_allclose(out[0, 0], 1.0, atol=0.01)
    np.testing.assert_allclose(c.normalize(np.zeros((1, 1, 1, 3))).ravel(),
                               -c.MEAN / np.array([0.2023, 0.1994, 0.2010]), rtol=1e-6)


def test_fedjax_train_pads_with_zero_pixels():
    img = np.full((3, 32, 32, 3), 200, np.uint8)
    out = c.pad_crop_flip(img, np.random.default_rng(1), per_image=False)
    # One crop for all: the same zero rows/cols in every image; at most 4 of each.
    zero_rows = [(out[k, :, :, 0] == 0).all(1).sum() for k in range(3)]
    assert len(set(zero_rows)) == 1 and zero_rows[0] <= 4
    full = c.preprocess_train_fedjax(img, np.random.default_rng(1), per_image=False)
    np.testing.assert_allclose(full, c.normalize(out))


def test_tff_train_and_eval_shapes():
    img = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    tr = c.preprocess_train(img, np.random.default_rng(0))
    ev = c.preprocess_eval(img)
    assert tr.shape == ev.shape == (3, 24, 24, 3) and tr.dtype == ev.dtype == np.float32
    np.testing.assert_allclose(ev.reshape(3, -1).mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(ev.reshape(3, -1).std(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ev, c.per_image_standardization(img[:, 4:28, 4:28]))
    # Same seed, same images.
    np.testing.assert_array_equal(tr, c.preprocess_train(img, np.random.default_rng(0)))


def test_bad_crops_raise():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError):
        c.center_crop(img, 33, 24)
    with pytest.raises(ValueError):
        c.random_crop_flip(img, np.random.default_rng(0), 24, 24, max_offset=(9, 0))
