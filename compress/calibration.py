"""One calibration-data protocol for every INT8 backend: unlabeled uint8 images -> float batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edge_ssl.errors import DataError
from edge_ssl.spec import InputSpec

#: Fewer images than this give unstable activation ranges (and entropy calibration needs more).
MIN_CALIBRATION_IMAGES = 16
#: Largest calibration batch: activations of every batch are held until the ranges are computed.
MAX_CALIBRATION_BATCH = 32


def even_batch_size(count: int, limit: int = MAX_CALIBRATION_BATCH) -> int:
    """The largest batch size <= ``limit`` that splits ``count`` images into equal batches.

    onnxruntime's histogram calibrators (entropy, percentile) stack every batch's
    activations with ``np.asarray``; a shorter last batch makes that array ragged and
    fails ("setting an array element with a sequence"). Equal batches use every image.
    """
    return next(size for size in range(min(limit, max(count, 1)), 0, -1) if count % size == 0)


def check_calibration_images(images: Any, input_spec: InputSpec,
                             minimum: int = MIN_CALIBRATION_IMAGES) -> np.ndarray:
    """uint8 (N, H, W, 3) images of the model's size, at least ``minimum`` of them."""
    images = np.asarray(images)
    channels, height, width = input_spec.shape
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
        raise DataError(
            f"calibration images must be uint8 (N, H, W, {channels}); got {images.dtype} "
            f"{tuple(images.shape)}. Load them with edge_ssl.data.sources.load_images (--data)."
        )
    if images.shape[1:3] != (height, width):
        raise DataError(
            f"calibration images are {images.shape[1]}x{images.shape[2]} but the model reads "
            f"{height}x{width}; load them with image_size={height}."
        )
    if len(images) < minimum:
        raise DataError(
            f"calibration needs at least {minimum} images; got {len(images)}. Pass more "
            "unlabeled images with --data (a few hundred is typical)."
        )
    return images


class ImageCalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over unlabeled images.

    ``get_next()`` returns ``{input_name: float32 (B, C, H, W)}`` preprocessed exactly as
    the runtime does (``edge_ssl.runtime.preprocess.preprocess_images``), then None;
    ``rewind()`` starts over. Iterating yields the same batches (the INC / torch path uses it).
    Every batch has the same size, at most ``batch_size`` (see :func:`even_batch_size`).
    """

    def __init__(self, images: np.ndarray, input_spec: InputSpec, *, input_name: str = "images",
                 batch_size: int = MAX_CALIBRATION_BATCH, minimum: int = MIN_CALIBRATION_IMAGES) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"calibration batch_size must be a positive integer; got {batch_size!r}.")
        self.images = check_calibration_images(images, input_spec, minimum)
        self.input_spec = input_spec
        self.input_name = input_name
        self.batch_size = even_batch_size(len(self.images), batch_size)
        self._position = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def batches(self) -> Iterator[np.ndarray]:
        from edge_ssl.runtime.preprocess import preprocess_images

        for start in range(0, len(self.images), self.batch_size):
            yield preprocess_images(self.images[start : start + self.batch_size], self.input_spec)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.batches()

    def get_next(self) -> dict[str, np.ndarray] | None:
        from edge_ssl.runtime.preprocess import preprocess_images

        if self._position >= len(self.images):
            return None
        chunk = self.images[self._position : self._position + self.batch_size]
        self._position += len(chunk)
        return {self.input_name: preprocess_images(chunk, self.input_spec)}

    def rewind(self) -> None:
        self._position = 0
