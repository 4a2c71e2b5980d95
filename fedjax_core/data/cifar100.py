"""Federated CIFAR-100 preprocessing (host side, numpy): TFF's and FedJAX's recipes.

Raw client arrays, as FedJAX's SQLite files decode them: `image` uint8 `[n, 32, 32, 3]`,
`label` int64 `[n]` in `[0, 100)`, `coarse_label` int64 `[n]` in `[0, 20)`.
`preprocess_client` keeps `x = image` (uint8) and `y = label` (int32), as FedJAX does.

Two recipes turn `x` into model inputs:

TFF (Reddi et al. 2021, "Adaptive Federated Optimization"; `build_image_map`), 24x24 crops:
    train  `preprocess_train`: per image, a random 24x24 crop (offsets uniform in
           `0 .. 32 - 24` inclusive, as `tf.image.random_crop`), a random left-right flip
           (probability 1/2, as `tf.image.random_flip_left_right`), then
           `per_image_standardization`.
    eval   `preprocess_eval`: the central 24x24 crop (offset `(32 - 24) // 2 = 4`, as
           `tf.image.resize_with_crop_or_pad`), then `per_image_standardization`.
    `per_image_standardization(x) = (x - mean) / max(std, 1 / sqrt(H * W * C))`, mean and
    (population) std over each image's pixels and channels, as
    `tf.image.per_image_standardization` (pixels in 0..255, not rescaled first).
    Note: Reddi et al.'s code (google-research/federated, `cifar100_dataset.py`) distorts
    train images; TFF's later `tff.simulation.baselines.cifar100` task uses the central
    crop for training too (`distort_image=False` by default). `preprocess_train` is the
    former; pass eval preprocessing to training for the latter.
    FedJAX's own port, `preprocess_image_tff`, divides by `max(std, sqrt(H * W * C))`
    instead of `1 / sqrt(...)`; we follow TensorFlow.

FedJAX (`preprocess_image`, after pytorch-cifar), 32x32:
    train  `preprocess_train_fedjax`: zero-pad 4 pixels on each side, a random 32x32 crop,
           a random left-right flip, then `normalize`. FedJAX draws the crop offsets with
           `np.random.randint(8)` (0 .. 7; pytorch-cifar's RandomCrop allows 0 .. 8) and
           draws ONE crop and ONE flip for the whole batch, from numpy's global state.
           Here offsets are 0 .. 7 as in FedJAX but drawn per image by default
           (`per_image=False` draws one for all the images passed in).
    eval   `preprocess_eval_fedjax`: `normalize` only.
    `normalize(x) = (x / 255 - MEAN) / STD`, FedJAX's constants.

Where the randomness happens here: on the host, per image, once per client per local
epoch, from an explicit `np.random.Generator`; seed it from the run seed and the
(round, client, epoch) indices, e.g. `np.random.default_rng([seed, round, client, epoch])`,
so a run is reproducible whatever the chunking or device count. (FedJAX augments per batch
at batch time; TFF per image each time the client dataset is iterated.)

The draws, in order, for `n` images: crop offsets `rng.integers(0, hi, size=(n, 2))`
(row, column), then flips `rng.random(n) < 0.5`; with `per_image=False`,
`rng.integers(0, hi, size=2)` then `rng.random() < 0.5`.

References:
  FedJAX, `fedjax/datasets/cifar100.py` (`preprocess_client`, `preprocess_image`,
  `preprocess_image_tff`); TFF,
  `simulation/baselines/cifar100/image_classification_preprocessing.py`;
  google-research/federated, `utils/datasets/cifar100_dataset.py`;
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
"""

from typing import Mapping

import numpy as np

NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
CROP_SIZE = (24, 24)
"""TFF's default crop (`DEFAULT_CROP_HEIGHT`, `DEFAULT_CROP_WIDTH`)."""
FEDJAX_PADDING = 4
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
"""FedJAX's per-channel mean of pixels in [0, 1]."""
INVERSE_STD = 1 / np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)
"""FedJAX's per-channel inverse standard deviation of pixels in [0, 1]."""
SPLITS = ("train", "test")


def preprocess_client(examples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FedJAX's client preprocessing: `{'x': image (uint8), 'y': int32(label)}`.

    Args:
      examples: `{'image': uint8 [n, 32, 32, 3], 'label': [n], ...}`; other keys dropped.

    Returns:
      `{'x': uint8 [n, 32, 32, 3], 'y': int32 [n]}`.
    """
    image = np.asarray(examples["image"])
    if image.ndim != 4 or image.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"CIFAR-100 expects image [n, 32, 32, 3], got {image.shape}")
    return {"x": image, "y": np.asarray(examples["label"]).astype(np.int32)}


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images [n, H, W, C], got shape {images.shape}")
    return images


def _check_crop(images: np.ndarray, height: int, width: int) -> None:
    h, w = images.shape[1:3]
    if not (1 <= height <= h and 1 <= width <= w):
        raise ValueError(f"crop {height}x{width} must fit in the {h}x{w} images")


def per_image_standardization(images: np.ndarray) -> np.ndarray:
    """Standardises each image, as `tf.image.per_image_standardization`.

    `y = (x - mean) / max(std, 1 / sqrt(H * W * C))`, mean and population std over the
    last three axes of each image (computed in float64).

    Args:
      images: `[n, H, W, C]`, any real dtype (uint8 pixels are used as 0 .. 255).

    Returns:
      `float32 [n, H, W, C]`.

    Example:
      >>> per_image_standardization(np.full((1, 2, 2, 3), 7, np.uint8)).max()  # constant
      np.float32(0.0)
    """
    x = _check_images(images).astype(np.float64)
    num = np.prod(x.shape[1:])
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    return ((x - mean) / np.maximum(std, 1.0 / np.sqrt(num))).astype(np.float32)


def center_crop(images: np.ndarray, height: int = CROP_SIZE[0],
                width: int = CROP_SIZE[1]) -> np.ndarray:
    """The central `height x width` window, offsets `((H - height) // 2, (W - width) // 2)`.

    As `tf.image.resize_with_crop_or_pad` for a crop no larger than the image.

    Args:
      images: `[n, H, W, C]`.
      height: crop height.
      width: crop width.

    Returns:
      `[n, height, width, C]`, same dtype.
    """
    images = _check_images(images)
    _check_crop(images, height, width)
    top = (images.shape[1] - height) // 2
    left = (images.shape[2] - width) // 2
    return images[:, top:top + height, left:left + width]


def _crop_at(images: np.ndarray, offsets: np.ndarray, height: int, width: int) -> np.ndarray:
    n = images.shape[0]
    rows = offsets[:, 0, None] + np.arange(height)  # [n, height]
    cols = offsets[:, 1, None] + np.arange(width)  # [n, width]
    return images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, height: int, width: int,
                     max_offset: tuple[int, int] | None = None,
                     per_image: bool = True) -> np.ndarray:
    """A random `height x width` crop then a random left-right flip.

    Offsets are uniform in `0 .. max_offset` (inclusive; default `(H - height, W - width)`,
    every window that fits). Draws, in order: offsets `rng.integers(0, max_offset + 1,
    size=(n, 2))`, flips `rng.random(n) < 0.5`; one of each for all images when
    `per_image=False`.

    Args:
      images: `[n, H, W, C]`.
      rng: the generator to draw from.
      height: crop height.
      width: crop width.
      max_offset: largest `(row, column)` offset.
      per_image: independent crop and flip per image (True) or one for all (False).

    Returns:
      `[n, height, width, C]`, same dtype.
    """
    images = _check_images(images)
    _check_crop(images, height, width)
    n, h, w = images.shape[:3]
    hi = np.array(max_offset if max_offset is not None else (h - height, w - width))
    if np.any(hi < 0) or hi[0] > h - height or hi[1] > w - width:
        raise ValueError(f"max_offset {tuple(hi)} does not fit a {height}x{width} crop of "
                         f"{h}x{w} images")
    if per_image:
        offsets = rng.integers(0, hi + 1, size=(n, 2))
        flips = rng.random(n) < 0.5
    else:
        offsets = np.broadcast_to(rng.integers(0, hi + 1, size=2), (n, 2))
        flips = np.full(n, rng.random() < 0.5)
    out = _crop_at(images, offsets, height, width)
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def preprocess_train(x: np.ndarray, rng: np.random.Generator,
                     crop: tuple[int, int] = CROP_SIZE) -> np.ndarray:
    """TFF's distorted train preprocessing: random crop, random flip, standardisation.

    Args:
      x: uint8 `[n, 32, 32, 3]`.
      rng: generator for the crops and flips (see the module docstring).
      crop: `(height, width)`.

    Returns:
      `float32 [n, height, width, 3]`.
    """
    return per_image_standardization(random_crop_flip(x, rng, crop[0], crop[1]))


def preprocess_eval(x: np.ndarray, crop: tuple[int, int] = CROP_SIZE) -> np.ndarray:
    """TFF's eval preprocessing: central crop, standardisation.

    Args:
      x: uint8 `[n, 32, 32, 3]`.
      crop: `(height, width)`.

    Returns:
      `float32 [n, height, width, 3]`.
    """
    return per_image_standardization(center_crop(x, crop[0], crop[1]))


def normalize(images: np.ndarray) -> np.ndarray:
    """FedJAX's normalisation: `(x / 255 - MEAN) * INVERSE_STD`, per channel, float32."""
    x = _check_images(images).astype(np.float32)
    return (x / np.float32(255) - MEAN) * INVERSE_STD


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator,
                  padding: int = FEDJAX_PADDING, per_image: bool = True) -> np.ndarray:
    """FedJAX's augmentation: zero-pad `padding` pixels, random crop back, random flip.

    Crop offsets are `0 .. 2 * padding - 1` (FedJAX's `np.random.randint(2 * padding)`).

    Args:
      images: `[n, H, W, C]`.
      rng: generator for the crops and flips (see the module docstring).
      padding: pixels added on each side.
      per_image: independent crop and flip per image (True) or one for all (False, FedJAX's
        per-batch behaviour when called on one batch).

    Returns:
      `[n, H, W, C]`, same dtype.
    """
    images = _check_images(images)
    if padding < 1:
        raise ValueError(f"padding must be >= 1, got {padding}")
    h, w = images.shape[1:3]
    padded = np.pad(images, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    top = 2 * padding - 1
    return random_crop_flip(padded, rng, h, w, max_offset=(top, top), per_image=per_image)


def preprocess_train_fedjax(x: np.ndarray, rng: np.random.Generator,
                            per_image: bool = True) -> np.ndarray:
    """FedJAX's train preprocessing: `normalize(pad_crop_flip(x))`, `float32 [n, 32, 32, 3]`."""
    return normalize(pad_crop_flip(x, rng, FEDJAX_PADDING, per_image))


def preprocess_eval_fedjax(x: np.ndarray) -> np.ndarray:
    """FedJAX's eval preprocessing: `normalize(x)`, `float32 [n, 32, 32, 3]`."""
    return normalize(x)


__all__ = ["CROP_SIZE", "FEDJAX_PADDING", "IMAGE_SHAPE", "INVERSE_STD", "MEAN", "NUM_CLASSES",
           "SPLITS", "center_crop", "normalize", "pad_crop_flip", "per_image_standardization",
           "preprocess_client", "preprocess_eval", "preprocess_eval_fedjax", "preprocess_train",
           "preprocess_train_fedjax", "random_crop_flip"]
