"""Streamed batches from large image folders and .tar shards, decoded in DataLoader workers or on the GPU."""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_ssl.data.shards import SampleIndex, build_index, estimate_decoded_bytes, is_shard_source
from edge_ssl.data.sources import describe_skipped, fit_square, load_images
from edge_ssl.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

STREAM_MODES = ("auto", "on", "off")
#: Folders whose estimated decoded size is above this are streamed by ``stream="auto"``.
DEFAULT_MEMORY_BUDGET_MB = 4096
#: Area range of the loader's random-resized-crop. Milder than an SSL view crop on purpose:
#: the GPU views crop again (scale down to 0.08), and the two compound.
DEFAULT_CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: A sample that fails to decode is replaced by the next one in the index, at most this often.
MAX_FALLBACK = 16
_JPEG_MAGIC = b"\xff\xd8"
log = logging.getLogger(__name__)


def default_workers() -> int:
    """Decode workers per process: this node's CPU cores shared by its training processes, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # set by torchrun
    return max(1, min(8, cores // max(1, per_node)))


# ------------------------------------------------------------------------------- crops


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: the same in any worker, on any rank."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


def crop_box(
    height: int, width: int, rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized-crop (Inception style, as torchvision draws it)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback: the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def decode_and_crop(
    data: bytes, size: int, rng: np.random.Generator | None,
    scale: tuple[float, float] = DEFAULT_CROP_SCALE,
) -> tuple[np.ndarray | None, str]:
    """(uint8 (size, size, 3), '') or (None, why it could not be decoded).

    With ``rng`` a random-resized-crop; without, the eval transform (shorter side to
    ``size``, centre crop). JPEGs are decoded at a reduced DCT scale when the crop allows.
    """
    from PIL import Image

    from edge_ssl.data.sources import decode_image_bytes

    if rng is None:
        image, why = decode_image_bytes(data)
        return (None, why) if image is None else (np.array(fit_square(image, size), np.uint8), "")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            plain_jpeg = probe.format == "JPEG" and probe.getexif().get(0x0112, 1) == 1
            width, height = probe.size
            if plain_jpeg:
                return _crop_jpeg(probe, size, crop_box(height, width, rng, scale)), ""
    except Image.DecompressionBombError as exc:
        return None, f"too large to decode safely ({exc})"
    except (OSError, ValueError, SyntaxError, EOFError):
        pass  # decode_image_bytes below names the reason
    image, why = decode_image_bytes(data)
    if image is None:
        return None, why
    top, left, h, w = crop_box(image.height, image.width, rng, scale)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return np.array(resized, np.uint8), ""


def _crop_jpeg(image: Any, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Decode only as many pixels as the crop needs (JPEG DCT scaling), then crop and resize."""
    from PIL import Image

    from edge_ssl.data.sources import _to_rgb

    top, left, h, w = box
    width, height = image.size
    image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
    sx, sy = image.size[0] / width, image.size[1] / height
    image = _to_rgb(image)
    scaled = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return np.array(image.resize((size, size), Image.Resampling.BILINEAR, box=scaled), np.uint8)


# ------------------------------------------------------------------------------- worker side


class _Samples:
    """Map-style dataset run inside DataLoader workers: read, decode, crop one sample.

    Returns (pixels, label, used index, raw, failures): ``raw`` marks undecoded JPEG bytes
    left for the GPU; ``failures`` names samples that could not be decoded and were
    replaced by the next ones in the index.
    """

    def __init__(
        self, index: SampleIndex, size: int, *, seed: int, epoch: int, train: bool,
        scale: tuple[float, float], raw_jpeg: bool,
    ) -> None:
        self.index, self.size, self.seed, self.epoch = index, size, seed, epoch
        self.train, self.scale, self.raw_jpeg = train, scale, raw_jpeg

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int, bool, list[tuple[str, str]]]:
        failures: list[tuple[str, str]] = []
        for attempt in range(MAX_FALLBACK):
            j = (int(i) + attempt) % len(self.index)
            pixels, raw, why = self._load(j)
            if pixels is not None:
                label = -1 if self.index.labels is None else int(self.index.labels[j])
                return pixels, label, j, raw, failures
            failures.append((self.index.name(j), why))
        raise DataError(
            f"{MAX_FALLBACK} samples in a row could not be decoded, from {self.index.name(int(i))}: "
            f"{describe_skipped(failures)}. Check the data source ({self.index.description})."
        )

    def _load(self, j: int) -> tuple[np.ndarray | None, bool, str]:
        try:
            data = self.index.read(j)
        except OSError as exc:
            return None, False, f"cannot read: {exc.strerror or exc}"
        if self.raw_jpeg and data[:2] == _JPEG_MAGIC and _plain_orientation(data):
            return np.frombuffer(data, dtype=np.uint8).copy(), True, ""
        rng = sample_rng(self.seed, self.epoch, j) if self.train else None
        pixels, why = decode_and_crop(data, self.size, rng, self.scale)
        return pixels, False, why


def _plain_orientation(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.getexif().get(0x0112, 1) == 1
    except (OSError, ValueError, SyntaxError, EOFError):
        return False  # the CPU path reports why it cannot be decoded


def _collate(items: list[tuple[np.ndarray, int, int, bool, list]]) -> dict[str, Any]:
    import torch

    failures = [f for item in items for f in item[4]]
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    used = [item[2] for item in items]
    if not any(item[3] for item in items):
        pixels = torch.from_numpy(np.stack([item[0] for item in items]))
        return {"pixels": pixels, "labels": labels, "used": used, "failures": failures}
    parts = [(torch.from_numpy(item[0]), item[3]) for item in items]
    return {"parts": parts, "labels": labels, "used": used, "failures": failures}


# ------------------------------------------------------------------------------- the source


class StreamingSource:
    """A :class:`edge_ssl.data.batches.BatchSource` that decodes images as it goes.

    Each epoch is the permutation ``default_rng(seed + epoch)`` of the index cut into
    global batches, rank ``r`` taking the ``r``-th slice of each (as the in-memory source
    does), so the ranks' shares are disjoint and the same after ``--resume``. Workers read
    and decode only their batches: host memory is bounded by ``batch_size x workers x
    prefetch``, not by the data. With ``decode_device="cuda"`` JPEGs are decoded by nvjpeg
    on the GPU; other formats still decode in the workers.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike] | SampleIndex,
        image_size: int,
        *,
        workers: int | None = None,
        decode_device: str = "cpu",
        crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
        prefetch_factor: int = 2,
        limit: int | None = None,
        note: str = "",
    ) -> None:
        _check_settings(image_size, workers, decode_device, crop_scale, prefetch_factor)
        self.index = paths if isinstance(paths, SampleIndex) else build_index(paths, limit=limit)
        self.image_size = int(image_size)
        self.workers = default_workers() if workers is None else int(workers)
        self.decode_device = decode_device
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.prefetch_factor = int(prefetch_factor)
        self.num_images = len(self.index)
        self.skipped: dict[str, str] = dict(self.index.skipped_files)
        self._listing_checked = False
        decode = f"decoded on {decode_device}" if decode_device != "cpu" else "decoded in workers"
        self.source = (
            f"{self.index.description}, streamed at {image_size}x{image_size} "
            f"({self.workers} workers, {decode}){note}"
        )

    def __repr__(self) -> str:
        return f"StreamingSource({self.source!r})"

    @property
    def labels(self) -> np.ndarray | None:
        return self.index.labels

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.index.class_names

    def fingerprint(self) -> str:
        return self.index.fingerprint()

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        return self.num_images // (batch_size * world_size)

    def rank_indices(self, epoch: int, batch_size: int, *, rank: int, world_size: int, seed: int) -> np.ndarray:
        """(steps, batch_size) sample indices this rank reads in ``epoch``; sorted within a batch."""
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}); got {rank}.")
        steps = self.steps_per_epoch(batch_size, world_size)
        order = np.random.default_rng(seed + epoch).permutation(self.num_images)
        grid = order[: steps * batch_size * world_size].reshape(steps, world_size, batch_size)
        return np.sort(grid[:, rank, :], axis=1)  # sorted: neighbouring reads within a shard

    def epoch_batches(
        self, epoch: int, batch_size: int, *, rank: int, world_size: int, seed: int, device: Any
    ) -> Iterator[torch.Tensor]:
        """This rank's float32 (batch_size, 3, S, S) batches in 0..1 on ``device``."""
        batches = self.rank_indices(epoch, batch_size, rank=rank, world_size=world_size, seed=seed)
        self._check_same_listing(world_size, device)
        samples = self._samples(seed=seed, epoch=epoch, train=True)
        for batch in self._loader(samples, batches.tolist(), device):
            yield self._to_device(batch, device, seed=seed, epoch=epoch)

    def _check_same_listing(self, world_size: int, device: Any) -> None:
        """Under a process group, refuse to train when the ranks listed different data.

        Each rank indexes the data itself; different listings (a node with a partial copy)
        would silently break the disjoint shares.
        """
        from edge_ssl.train.distributed import gather_batch
        from edge_ssl.train.distributed import world_size as group_size

        if world_size <= 1 or self._listing_checked or group_size() != world_size:
            return
        import torch

        mine = torch.tensor([[int(self.fingerprint()[:15], 16), self.num_images]], device=device)
        every = gather_batch(mine).cpu()
        if bool((every != every[0]).any()):
            counts = ", ".join(f"rank {r}: {int(n)}" for r, n in enumerate(every[:, 1]))
            raise DataError(
                f"the {world_size} processes see different data in {self.index.description} "
                f"(images per rank: {counts}); every node must hold the same files at the same "
                "paths (a shared file system, or identical copies)."
            )
        self._listing_checked = True

    def iter_labeled_arrays(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every image once, in index order, centre-cropped: (uint8 (n, S, S, 3), int64 labels).

        Labels are -1 for an unlabeled source; the last batch may be smaller. This is the
        eval transform of the in-memory path (shorter side to S, centre crop).
        """
        order = np.arange(self.num_images)
        batches = [order[i : i + batch_size].tolist() for i in range(0, self.num_images, batch_size)]
        samples = self._samples(seed=0, epoch=0, train=False)
        for batch in self._loader(samples, batches, "cpu"):
            self._note_failures(batch["failures"])
            yield batch["pixels"].numpy(), batch["labels"].numpy()

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[StreamingSource, StreamingSource]:
        """(train, test) parts, split as :func:`edge_ssl.data.sources.split_dataset` splits."""
        return tuple(self._with_index(part) for part in self.index.split(test_fraction, seed))

    def limited(self, limit: int) -> StreamingSource:
        """The first ``limit`` images."""
        if limit >= self.num_images:
            return self
        return self._with_index(self.index.subset(np.arange(limit), f"{self.index.description}, first {limit}"))

    def _with_index(self, index: SampleIndex) -> StreamingSource:
        return StreamingSource(
            index, self.image_size, workers=self.workers, decode_device=self.decode_device,
            crop_scale=self.crop_scale, prefetch_factor=self.prefetch_factor,
        )

    def _samples(self, *, seed: int, epoch: int, train: bool) -> _Samples:
        raw = train and self.decode_device != "cpu"
        return _Samples(
            self.index, self.image_size, seed=seed, epoch=epoch, train=train,
            scale=self.crop_scale, raw_jpeg=raw,
        )

    def _loader(self, samples: _Samples, batches: list[list[int]], device: Any) -> Any:
        import torch
        from torch.utils.data import DataLoader

        pin = torch.device(device).type == "cuda"
        extra = {"prefetch_factor": self.prefetch_factor} if self.workers > 0 else {}
        return DataLoader(
            samples, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
            pin_memory=pin, **extra,
        )

    def _to_device(self, batch: dict[str, Any], device: Any, *, seed: int, epoch: int) -> torch.Tensor:
        self._note_failures(batch["failures"])
        if "pixels" in batch:
            return uint8_to_device(batch["pixels"], device)
        failed: list[tuple[int, str]] = []
        pixels = assemble_raw_batch(
            batch["parts"], batch["used"], self.image_size, device,
            seed=seed, epoch=epoch, scale=self.crop_scale, failed=failed,
        )
        self._note_failures([(self.index.name(i), why) for i, why in failed])
        return pixels

    def _note_failures(self, failures: list[tuple[str, str]]) -> None:
        new = [(name, why) for name, why in failures if name not in self.skipped]
        if new:
            self.skipped.update(new)
            log.warning("%s; each was replaced by the next sample", describe_skipped(new))


def uint8_to_device(pixels: torch.Tensor, device: Any) -> torch.Tensor:
    """uint8 NHWC (pinned when the target is a GPU) -> float32 NCHW in 0..1, channels_last."""
    import torch

    device = torch.device(device)
    batch = pixels.to(device, non_blocking=pixels.is_pinned())
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def assemble_raw_batch(
    parts: list[tuple[torch.Tensor, bool]], used: list[int], size: int, device: Any, *,
    seed: int, epoch: int, scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    failed: list[tuple[int, str]] | None = None,
) -> torch.Tensor:
    """The GPU-decode path: decode raw JPEG parts on ``device`` (nvjpeg on CUDA) in one call,
    random-resized-crop each with the same draw as the CPU path, and stack with the parts the
    workers already decoded. Works on any device, so its logic is tested on CPU.

    A JPEG that no decoder reads is replaced by the batch's previous image (the next one
    for the first) and reported as (index, why) in ``failed``.
    """
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    decoded = iter(_decode_jpegs([tensor for tensor, is_raw in parts if is_raw], device))
    out: list[Any] = []
    for (tensor, is_raw), index in zip(parts, used, strict=True):
        if not is_raw:
            out.append(tensor.to(device, non_blocking=tensor.is_pinned()).permute(2, 0, 1).float())
            continue
        image = next(decoded)
        if isinstance(image, str):
            out.append(None)
            if failed is not None:
                failed.append((index, image))
            continue
        top, left, h, w = crop_box(image.shape[1], image.shape[2], sample_rng(seed, epoch, index), scale)
        crop = image[None, :, top : top + h, left : left + w].float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(resized[0].round_().clamp_(0, 255))  # the same 8-bit values a CPU decode gives
    good = [i for i, image in enumerate(out) if image is not None]
    if not good:
        raise DataError(f"no image of a batch could be decoded (samples {used}); check the data source.")
    out = [image if image is not None else out[max((g for g in good if g < i), default=good[0])]
           for i, image in enumerate(out)]
    batch = torch.stack(out).div_(255.0)
    return batch.contiguous(memory_format=torch.channels_last)


def _decode_jpegs(raw: list[torch.Tensor], device: torch.device) -> list[Any]:
    """uint8 (3, H, W) images on ``device``, or why one could not be decoded.

    One batched call; when it fails (nvJPEG refuses a few flavours libjpeg reads, such as
    CMYK, or a file is corrupt) each image is decoded on its own on the CPU.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        try:
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return [_decode_jpeg_on_cpu(t, device) for t in raw]


def _decode_jpeg_on_cpu(data: torch.Tensor, device: torch.device) -> Any:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB).to(device)
    except RuntimeError as exc:
        return f"corrupt image: {str(exc).splitlines()[0]}"


def _check_settings(
    image_size: Any, workers: Any, decode_device: Any, crop_scale: Any, prefetch_factor: Any
) -> None:
    from edge_ssl.config import check_positive

    check_positive("streaming", image_size=image_size, prefetch_factor=prefetch_factor)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"--workers must be an integer >= 0 (0 decodes in the main process); got {workers!r}.")
    if not isinstance(decode_device, str) or not (decode_device == "cpu" or decode_device.startswith("cuda")):
        raise ConfigError(f"decode_device must be 'cpu', 'cuda' or 'cuda:N'; got {decode_device!r}.")
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"crop_scale must be (low, high) with 0 < low <= high <= 1; got {crop_scale!r}.")


# ------------------------------------------------------------------------------- choosing


def choose_source(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None,
    image_size: int,
    *,
    stream: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    load_size: int | None = None,
    split: str = "train",
    limit: int | None = None,
    workers: int | None = None,
    decode_device: str = "cpu",
) -> Any:
    """A BatchSource for ``paths``: in memory (:class:`edge_ssl.data.batches.InMemoryBatches`) or streamed.

    ``stream="on"`` streams; ``"off"`` decodes everything into memory; ``"auto"`` streams
    .tar shards always, and image folders whose estimated decoded size exceeds
    ``memory_budget_mb``; .npz, CIFAR folders and the embedded default (``paths=None``) stay
    in memory. ``load_size`` (``--image-size``) is the size images are brought to before the
    views, on either path; streamed batches default to ``image_size``, the encoder's input.
    """
    from edge_ssl.data.batches import InMemoryBatches

    if stream not in STREAM_MODES:
        raise ConfigError(f"--stream must be one of {', '.join(STREAM_MODES)}; got {stream!r}.")
    if paths is not None and isinstance(paths, (list, tuple)) and not paths:
        paths = None
    if stream != "off":
        plan = _streaming_plan(paths, stream, memory_budget_mb, limit)
        if plan is not None:
            index, note = plan
            size = load_size or image_size
            return StreamingSource(index, size, workers=workers, decode_device=decode_device, note=note)
    return InMemoryBatches(load_images(paths, split=split, image_size=load_size, limit=limit))


def _streaming_plan(
    paths: Any, stream: str, memory_budget_mb: float, limit: int | None
) -> tuple[SampleIndex, str] | None:
    """(index, why it is streamed) when ``paths`` should stream, else None."""
    listed = [] if paths is None else [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if stream == "on":
        if not listed:
            raise DataError("--stream on needs --data: the embedded digits set is only loaded in memory.")
        return build_index(listed, limit=limit), ""
    from edge_ssl.data.sources import detect_format

    if not listed or any(
        not is_shard_source(p) and detect_format(p) in ("npz", "cifar10-python") for p in listed
    ):
        return None
    if any(is_shard_source(p) for p in listed):
        return build_index(listed, limit=limit), " (auto: .tar shards always stream)"
    index = build_index(listed, limit=limit)
    estimate_mb = estimate_decoded_bytes(index) / 2**20
    if estimate_mb <= memory_budget_mb:
        return None
    return index, (
        f" (auto: ~{estimate_mb:,.1f} MB decoded > memory budget {memory_budget_mb:,.1f} MB)"
    )


# ------------------------------------------------------------------------------- eval


def stream_eval_sources(
    data: Any, test_data: Any, image_size: int, *, stream: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, limit: int | None = None,
    workers: int | None = None, test_fraction: float = 0.2, seed: int = 0,
) -> tuple[StreamingSource, StreamingSource] | None:
    """Streamed labeled (train, test) for ``edge-ssl eval``, or None when ``data`` stays in memory.

    Without ``test_data`` the source is split stratified, as the in-memory path splits it.
    """
    plan = _eval_plan(data, stream, memory_budget_mb)
    if plan is None:
        return None
    return _eval_sources(plan, test_data, image_size, limit=limit, workers=workers,
                         test_fraction=test_fraction, seed=seed)


def _eval_plan(data: Any, stream: str, memory_budget_mb: float) -> tuple[SampleIndex, str] | None:
    if stream not in STREAM_MODES:
        raise ConfigError(f"--stream must be one of {', '.join(STREAM_MODES)}; got {stream!r}.")
    return None if stream == "off" else _streaming_plan(data, stream, memory_budget_mb, None)


def _eval_sources(
    plan: tuple[SampleIndex, str], test_data: Any, image_size: int, *, limit: int | None,
    workers: int | None, test_fraction: float, seed: int,
) -> tuple[StreamingSource, StreamingSource]:
    train = StreamingSource(plan[0], image_size, workers=workers, note=plan[1])
    if test_data is not None:
        test = StreamingSource(build_index(test_data), image_size, workers=workers)
    else:
        train, test = train.split(test_fraction, seed)
    return (train.limited(limit) if limit else train), test


def embed_source(
    encoder: Any, source: StreamingSource, *, batch_size: int = 256, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (N, D) embeddings, int64 labels, -1 when unlabeled) of every image, streamed.

    Each decoded chunk goes through :func:`edge_ssl.evaluate.embed` (the one embedding
    path); the encoder is copied to ``device`` once, never moved.
    """
    import copy

    from edge_ssl.device import resolve_device
    from edge_ssl.evaluate import embed

    device = str(resolve_device(device))
    model = copy.deepcopy(encoder).to(device)
    chunks, labels = [], []
    for images, batch_labels in source.iter_labeled_arrays(batch_size):
        chunks.append(embed(model, images, batch_size=batch_size, device=device))
        labels.append(batch_labels)
    return np.concatenate(chunks), np.concatenate(labels).astype(np.int64)


def evaluate_streamed(encoder: Any, train: StreamingSource, test: StreamingSource, config: Any) -> Any:
    """:func:`edge_ssl.evaluate.evaluate_encoder` for streamed sources: embed in batches, then score."""
    import time

    from edge_ssl.evaluate import EvalResult, embedding_health, knn_top1, linear_probe_top1

    started = time.perf_counter()
    for role, part in (("train", train), ("test", test)):
        if part.labels is None:
            raise DataError(
                f"evaluation needs class labels, but the {role} data ({part.source}) has none; "
                "use class subfolders, or .tar shards whose samples carry key.cls."
            )
    train_emb, train_labels = embed_source(encoder, train, batch_size=config.batch_size, device=config.device)
    test_emb, test_labels = embed_source(encoder, test, batch_size=config.batch_size, device=config.device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if train.class_names is not None:
        num_classes = max(num_classes, len(train.class_names))
    knn = {
        k: knn_top1(train_emb, train_labels, test_emb, test_labels, k=k,
                    temperature=config.knn_temperature, num_classes=num_classes)
        for k in config.knn_k
    }
    probe = linear_probe_top1(
        train_emb, train_labels, test_emb, test_labels, seed=config.seed, max_iter=config.probe_max_iter
    ) if config.probe else None
    return EvalResult(
        knn_top1=knn, linear_probe_top1=probe, health=embedding_health(train_emb),
        num_train=len(train_labels), num_test=len(test_labels), num_classes=num_classes,
        seconds=time.perf_counter() - started,
    )


def evaluate_bundle_streamed(
    bundle_path: Any, data: Any, test_data: Any = None, config: Any = None, *,
    stream: str = "auto", workers: int | None = None, limit: int | None = None,
    image_size: int | None = None, results: Any = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> tuple[Any, Any]:
    """:func:`edge_ssl.evaluate.evaluate_bundle`, embedding in streamed batches when ``stream`` says so.

    In-memory data goes to ``evaluate_bundle`` unchanged; streamed data is cropped to the
    bundle's input size and recorded in the same results file, under the same key.
    """
    from edge_ssl.bundle import Bundle, record_results
    from edge_ssl.config import config_to_dict
    from edge_ssl.evaluate import EvalConfig, evaluate_bundle, results_target
    from edge_ssl.models import load_encoder

    config = EvalConfig() if config is None else config
    plan = _eval_plan(data, stream, memory_budget_mb)
    if plan is None:
        return evaluate_bundle(bundle_path, data, test_data, config, limit=limit,
                               image_size=image_size, results=results)
    bundle = Bundle.open(bundle_path, verify=True)
    target = results_target(bundle.path, results)
    encoder = load_encoder(bundle)
    train, test = _eval_sources(plan, test_data, image_size or encoder.spec.input.image_size, limit=limit,
                                workers=workers, test_fraction=0.2, seed=config.seed)
    result = evaluate_streamed(encoder, train, test, config)
    record = result.to_dict() | {
        "train_data": train.source, "test_data": test.source, "config": config_to_dict(config),
    }
    return result, (None if target is None else record_results(bundle, "eval", record, path=target))


def input_size_for(arch: str, arch_kwargs: dict[str, Any] | None = None) -> int:
    """The square input size of encoder ``arch`` with ``arch_kwargs`` (its image_size, or the default)."""
    from edge_ssl.models import encoder_info

    size = (arch_kwargs or {}).get("image_size")
    return int(size) if size is not None else int(encoder_info(arch).input_size)


def describe_source(source: Any) -> str:
    """One line for the log: where the data comes from and what was skipped, with why."""
    dataset = getattr(source, "dataset", None)
    skipped = dataset.skipped_summary() if dataset is not None else describe_skipped(
        tuple(getattr(source, "skipped", {}).items())
    )
    return f"data: {source.source}" + (f"; {skipped}" if skipped else "")
