"""Evaluate frozen encoders: weighted kNN, linear probe and embedding-collapse health."""

from __future__ import annotations

import copy
import math
import numbers
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_ssl.errors import ConfigError, DataError
from edge_ssl.lazy import require

if TYPE_CHECKING:
    import torch

    from edge_ssl.spec import EncoderSpec

__all__ = [
    "COLLAPSE_MIN_EFFECTIVE_RANK",
    "COLLAPSE_STD_RATIO",
    "LINEAR_PROBE_C",
    "EmbeddingHealth",
    "EvalConfig",
    "EvalResult",
    "embed",
    "embedding_health",
    "evaluate_encoder",
    "knn_top1",
    "linear_probe_top1",
    "resolve_device",
]

# SimSiam (Chen & He 2021, Sec. 4.1, Fig. 2): the per-dimension std of L2-normalized outputs
# drops to ~0 when the network collapses to a constant and stays near 1/sqrt(D) otherwise.
# Backbone features taken after a ReLU share a mean direction, so they sit well below
# 1/sqrt(D) without being collapsed: randomly initialized resnet18_cifar backbones measure
# 0.05x (the embedded digits) to 0.2x (CIFAR-10) while their kNN accuracy is far above chance. 1/50
# stays under those and far above the ~0 of a collapsed encoder.
COLLAPSE_STD_RATIO = 0.02

# Every embedding on one line through the origin (effective rank 1) is collapse even when the
# std looks healthy, e.g. two antipodal clusters. 1.5 lies halfway between one direction and
# two equally used ones, so float noise around 1 never clears it and a real second axis does.
COLLAPSE_MIN_EFFECTIVE_RANK = 1.5

# Inverse L2 strength of the probe, on standardized features. A fixed C keeps `evaluate` fast
# and comparable between runs; protocols that sweep C (SimCLR, DINO) report a little higher.
LINEAR_PROBE_C = 1.0

# Rows below this norm are left as zeros by L2 normalization (as torch.nn.functional.normalize).
_NORM_EPS = 1e-12
# Rows per block for the float64 statistics of embedding_health (bounds its memory).
_HEALTH_CHUNK = 4096
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_DEVICE_ALLOWED = "'auto', 'cpu', 'cuda' or 'cuda:N' (N = GPU index)"
_MAX_SEED = 2**32 - 1  # numpy / scikit-learn random_state bound
_LABELED_SOURCES = (
    "an image folder with one subfolder per class (root/<class>/*.png) or an .npz file "
    "holding labels 'y' next to the images 'x' (e.g. ../shared/data/cifar10/cifar10_test.npz)"
)


# --------------------------------------------------------------------------- argument checks


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1; got {value!r}.")
    return int(value)


def _temperature(name: str, value: Any) -> float:
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{name} must be a finite number > 0; got {value!r}. 0.07 is the usual kNN "
            f"temperature (Wu et al. 2018, DINO); lower values trust the closest neighbours more."
        )
    return float(value)


def _seed(name: str, value: Any) -> int:
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or not 0 <= value <= _MAX_SEED
    ):
        raise ConfigError(f"{name} must be an integer in 0..{_MAX_SEED}; got {value!r}.")
    return int(value)


def _check_device_format(name: str, device: Any) -> None:
    if not isinstance(device, str) or not _DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(
            f"{name} must be {_DEVICE_ALLOWED}; got {device!r}. For an NVIDIA GPU use 'cuda'."
        )


# --------------------------------------------------------------------------- configs / results


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate a frozen encoder.

    ``knn_k``: neighbour counts; 20 and 200 are the values of Wu et al. 2018 and DINO.
    ``knn_temperature``: T in the kNN vote weights exp(sim / T); lower T trusts the closest
    neighbours more. ``probe``: also fit a linear probe (slower: seconds to minutes on 50k
    images). ``probe_max_iter``: L-BFGS iterations; raise it when scikit-learn warns that
    the probe did not converge. ``batch_size``: images per encoder forward pass; lower it on
    out-of-memory errors. ``device``: 'auto' picks CUDA when available. ``seed``: the probe's
    random_state.
    """

    knn_k: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07
    probe: bool = True
    probe_max_iter: int = 1000
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.knn_k, (tuple, list)) or not self.knn_k:
            raise ConfigError(
                f"EvalConfig.knn_k must be a non-empty tuple of neighbour counts; got "
                f"{self.knn_k!r}. Write e.g. knn_k=(20, 200), or knn_k=(20,) for one k."
            )
        ks = tuple(_positive_int("EvalConfig.knn_k entry", k) for k in self.knn_k)
        if len(set(ks)) != len(ks):
            raise ConfigError(
                f"EvalConfig.knn_k has duplicates: {ks}. List each neighbour count once."
            )
        object.__setattr__(self, "knn_k", ks)
        object.__setattr__(
            self,
            "knn_temperature",
            _temperature("EvalConfig.knn_temperature", self.knn_temperature),
        )
        if not isinstance(self.probe, (bool, np.bool_)):
            raise ConfigError(f"EvalConfig.probe must be True or False; got {self.probe!r}.")
        object.__setattr__(self, "probe", bool(self.probe))
        object.__setattr__(
            self, "probe_max_iter", _positive_int("EvalConfig.probe_max_iter", self.probe_max_iter)
        )
        object.__setattr__(
            self, "batch_size", _positive_int("EvalConfig.batch_size", self.batch_size)
        )
        _check_device_format("EvalConfig.device", self.device)
        object.__setattr__(self, "seed", _seed("EvalConfig.seed", self.seed))


@dataclass(frozen=True)
class EmbeddingHealth:
    """Collapse statistics of a set of embeddings (see :func:`embedding_health`)."""

    dim_std_mean: float  # mean over dims of the per-dimension std of L2-normalized embeddings
    dim_std_min: float
    uniform_std: float  # 1/sqrt(D): what a non-collapsed, spread embedding approaches
    effective_rank: float  # Roy & Vetterli 2007, in [1, min(N, D)]; 0 for all-zero embeddings
    embed_dim: int
    collapsed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalResult:
    """Accuracies (fractions in [0, 1]) and health of one evaluation."""

    knn_top1: dict[int, float]
    linear_probe_top1: float | None
    health: EmbeddingHealth
    num_train: int
    num_test: int
    num_classes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: kNN keys become strings (JSON objects only have string keys)."""
        return {
            "knn_top1": {str(k): float(v) for k, v in self.knn_top1.items()},
            "linear_probe_top1": self.linear_probe_top1,
            "health": self.health.to_dict(),
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------- devices


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; check that 'cuda[:N]' exists."""
    _check_device_format("device", device)
    if device == "cpu":
        return "cpu"
    torch = require("torch", "choosing a device")
    available = bool(torch.cuda.is_available())
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ConfigError(
            f"device {device!r} was requested but CUDA is not available to torch "
            f"{torch.__version__} (built for CUDA {torch.version.cuda}). Use device='cpu' or "
            f"'auto', or run on a machine with an NVIDIA GPU and a CUDA build of torch."
        )
    if ":" in device:
        index = int(device.split(":", 1)[1])
        count = int(torch.cuda.device_count())
        if index >= count:
            raise ConfigError(
                f"device {device!r} does not exist: torch sees {count} GPU(s), "
                f"indices 0..{count - 1}. Pick one of those or use 'cuda'."
            )
    return device


# --------------------------------------------------------------------------- embeddings


def embed(
    encoder: torch.nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """Embed uint8 (N, H, W, 3) images with ``encoder``; returns float32 (N, D).

    Images go through :func:`edge_ssl.tensors.preprocess` with ``encoder.spec.input``.
    The encoder runs in eval mode under ``torch.inference_mode``; every submodule's
    train/eval flag is restored afterwards. An encoder that lives on another device is
    copied there, never moved, so the caller's module is left exactly as it was.
    """
    torch = require("torch", "computing embeddings")
    from edge_ssl.tensors import preprocess

    spec = _encoder_spec(encoder)
    batch_size = _positive_int("embed batch_size", batch_size)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"embed expects uint8 images shaped (N, H, W, 3); got {images.dtype} "
            f"{tuple(images.shape)}. Load images through edge_ssl.data, which yields that layout."
        )
    if len(images) == 0:
        return np.empty((0, spec.embed_dim), dtype=np.float32)
    resolved = resolve_device(device)
    model = _on_device(encoder, resolved, torch)
    input_dtype = next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32
    )
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = preprocess(images[start : start + batch_size], spec.input, resolved)
                out = model(batch.to(input_dtype))
                _check_encoder_output(out, len(batch), spec, torch)
                chunks.append(out.float().cpu().numpy())
    finally:
        # Per module, not model.train(mode): a submodule the caller froze in eval stays frozen.
        for module, training in modes:
            module.training = training
    return np.concatenate(chunks, axis=0)


def _encoder_spec(encoder: Any) -> EncoderSpec:
    from edge_ssl.spec import EncoderSpec

    spec = getattr(encoder, "spec", None)
    if not isinstance(spec, EncoderSpec):
        raise ConfigError(
            f"the encoder ({type(encoder).__name__}) has no .spec EncoderSpec (got "
            f"{type(spec).__name__}); it says how to preprocess images and the embedding "
            f"size. Build encoders with edge_ssl.models.create_encoder or set encoder.spec."
        )
    return spec


def _on_device(encoder: torch.nn.Module, device: str, torch: Any) -> torch.nn.Module:
    """``encoder`` if all its tensors are on ``device``, else a copy moved there."""
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    tensors = [*encoder.parameters(), *encoder.buffers()]
    if all(t.device == target for t in tensors):
        return encoder
    return copy.deepcopy(encoder).to(target)


def _check_encoder_output(out: Any, batch: int, spec: EncoderSpec, torch: Any) -> None:
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"the encoder must return one (N, D) tensor of embeddings; it returned "
            f"{type(out).__name__}. Evaluate the backbone, not a model that returns heads too."
        )
    if out.ndim != 2 or out.shape[0] != batch or out.shape[1] != spec.embed_dim:
        raise ConfigError(
            f"the encoder returned shape {tuple(out.shape)} for {batch} images; expected "
            f"({batch}, {spec.embed_dim}) from its spec (embed_dim={spec.embed_dim}). Pool the "
            f"features to a vector, or fix encoder.spec.embed_dim."
        )


# --------------------------------------------------------------------------- kNN


def knn_top1(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    test_emb: np.ndarray,
    test_labels: np.ndarray,
    *,
    k: int,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier used to evaluate SSL encoders.

    Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination"), as in DINO's ``eval_knn.py``: embeddings are L2-normalized; each test
    row takes its k train rows of highest cosine similarity s_i, each votes for its label
    with weight exp(s_i / T), and the class with the largest summed weight is predicted.

    Shapes: train_emb (N, D), train_labels (N,), test_emb (M, D), test_labels (M,);
    labels are integers in [0, num_classes). ``num_classes`` defaults to the largest label
    + 1. ``k`` above N is clamped to N (every train row votes); the accuracy is the same as
    for k = N. Ties: equal class scores go to the lowest class index; which of several train
    rows with exactly the same similarity fills the last neighbour slots is unspecified.

    Test rows are processed ``chunk`` at a time; peak memory is about
    chunk * N * 12 bytes (similarities and neighbour indices), so lower ``chunk`` for banks
    of hundreds of thousands of rows. Weights are computed as exp((s_i - s_max) / T), which
    scales each row's scores by one constant: the vote is unchanged and small T cannot
    overflow.
    """
    k = _positive_int("knn_top1 k", k)
    temperature = _temperature("knn_top1 temperature", temperature)
    chunk = _positive_int("knn_top1 chunk", chunk)
    train_emb, train_labels, test_emb, test_labels = _check_split(
        train_emb, train_labels, test_emb, test_labels
    )
    num_classes = _num_classes_for(train_labels, test_labels, num_classes)

    num_train = len(train_emb)
    k = min(k, num_train)
    bank = _l2_normalize(train_emb.astype(np.float32))
    correct = 0
    for start in range(0, len(test_emb), chunk):
        queries = _l2_normalize(test_emb[start : start + chunk].astype(np.float32))
        sim = queries @ bank.T  # (b, N) cosine similarities
        # The k largest per row sit, unordered, after position N - k.
        neighbours = np.argpartition(sim, num_train - k, axis=1)[:, num_train - k :]
        top_sim = np.take_along_axis(sim, neighbours, axis=1).astype(np.float64)
        weights = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / temperature)
        rows = np.arange(len(queries))[:, None]
        flat = (rows * num_classes + train_labels[neighbours]).ravel()
        scores = np.bincount(flat, weights=weights.ravel(), minlength=len(queries) * num_classes)
        predictions = scores.reshape(len(queries), num_classes).argmax(axis=1)
        correct += int(np.count_nonzero(predictions == test_labels[start : start + chunk]))
    return correct / len(test_emb)


# --------------------------------------------------------------------------- linear probe


def linear_probe_top1(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    test_emb: np.ndarray,
    test_labels: np.ndarray,
    *,
    seed: int = 0,
    max_iter: int = 1000,
) -> float:
    """Top-1 accuracy of a linear classifier trained on frozen embeddings.

    scikit-learn ``StandardScaler`` then multinomial ``LogisticRegression`` (L-BFGS, L2,
    C = LINEAR_PROBE_C). Shapes as in :func:`knn_top1`. scikit-learn warns when L-BFGS
    stops at ``max_iter`` before converging; raise it then.
    """
    max_iter = _positive_int("linear_probe_top1 max_iter", max_iter)
    seed = _seed("linear_probe_top1 seed", seed)
    train_emb, train_labels, test_emb, test_labels = _check_split(
        train_emb, train_labels, test_emb, test_labels
    )
    classes = np.unique(train_labels)
    if len(classes) < 2:
        raise DataError(
            f"the linear probe needs at least 2 classes in the train labels; got only class "
            f"{int(classes[0])}. Use a train set that covers the classes, or turn the probe off "
            f"(EvalConfig(probe=False))."
        )
    require("sklearn", "the linear probe")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=LINEAR_PROBE_C, solver="lbfgs", max_iter=max_iter, random_state=seed),
    )
    probe.fit(train_emb, train_labels)
    predictions = probe.predict(test_emb)
    return float(np.mean(predictions == test_labels))


# --------------------------------------------------------------------------- collapse health


def embedding_health(embeddings: np.ndarray) -> EmbeddingHealth:
    """Collapse statistics of (N, D) embeddings, N >= 2.

    ``dim_std_*``: per-dimension std over the N L2-normalized rows; near 1/sqrt(D)
    (``uniform_std``) when the embeddings spread over the sphere, near 0 when they collapse
    to one point (SimSiam, Chen & He 2021, Sec. 4.1). ``effective_rank``: Roy & Vetterli
    2007, exp of the Shannon entropy of the singular values of the L2-normalized (not
    centered) matrix divided by their sum; D for a spread embedding, 1 when all rows point
    one way, 0 when all rows are zero. ``collapsed``: std mean below COLLAPSE_STD_RATIO
    * uniform_std, or effective rank below COLLAPSE_MIN_EFFECTIVE_RANK (capped at D).
    """
    x = _check_embeddings("embeddings", embeddings)
    num, dim = x.shape
    if num < 2:
        raise DataError(
            f"embedding health needs at least 2 embeddings to measure spread; got {num}. "
            f"Evaluate on more images."
        )
    mean = sum(block.sum(axis=0) for block in _unit_blocks(x)) / num
    squares = sum(((block - mean) ** 2).sum(axis=0) for block in _unit_blocks(x))
    # The smaller Gram matrix (D x D, or N x N when there are fewer rows than dims) has the
    # squared singular values as eigenvalues at a fraction of the cost of an SVD of N x D.
    if num >= dim:
        gram = sum(block.T @ block for block in _unit_blocks(x))
    else:
        unit = np.concatenate(list(_unit_blocks(x)), axis=0)
        gram = unit @ unit.T
    dim_std = np.sqrt(squares / num)
    uniform_std = 1.0 / math.sqrt(dim)
    rank = _effective_rank_from_gram(gram, num, dim)
    collapsed = bool(
        dim_std.mean() < COLLAPSE_STD_RATIO * uniform_std
        or rank < min(COLLAPSE_MIN_EFFECTIVE_RANK, dim)
    )
    return EmbeddingHealth(
        dim_std_mean=float(dim_std.mean()),
        dim_std_min=float(dim_std.min()),
        uniform_std=uniform_std,
        effective_rank=rank,
        embed_dim=int(dim),
        collapsed=collapsed,
    )


def _unit_blocks(x: np.ndarray) -> Iterator[np.ndarray]:
    """L2-normalized float64 row blocks of ``x`` (no full float64 copy in memory)."""
    for start in range(0, len(x), _HEALTH_CHUNK):
        yield _l2_normalize(x[start : start + _HEALTH_CHUNK].astype(np.float64))


def _effective_rank_from_gram(gram: np.ndarray, num: int, dim: int) -> float:
    eigenvalues = np.linalg.eigvalsh(gram)
    top = float(eigenvalues.max()) if eigenvalues.size else 0.0
    if top <= 0.0:
        return 0.0
    # Eigenvalues below this are rounding noise of a zero singular value (the tolerance of
    # numpy.linalg.matrix_rank, applied to squares); keeping them would inflate the rank.
    noise = top * max(num, dim) * np.finfo(np.float64).eps
    singular = np.sqrt(eigenvalues[eigenvalues > noise])
    p = singular / singular.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


# --------------------------------------------------------------------------- end to end


def evaluate_encoder(
    encoder: torch.nn.Module,
    train: Any,
    test: Any,
    config: EvalConfig = EvalConfig(),
) -> EvalResult:
    """Embed labeled ``train`` and ``test`` images with a frozen encoder and score them.

    ``train``/``test`` are :class:`edge_ssl.data.ImageDataset`-like: ``.images`` uint8
    (N, H, W, 3), ``.labels`` int array or None, ``.num_classes``. The train embeddings are
    the kNN bank and the probe's training set; health is measured on them. The encoder is
    not modified (see :func:`embed`).
    """
    if not isinstance(config, EvalConfig):
        raise ConfigError(
            f"evaluate_encoder needs an EvalConfig; got {type(config).__name__}. "
            f"Build one with EvalConfig(...) or edge_ssl.config.config_from_dict."
        )
    started = time.perf_counter()
    train_images, train_labels = _labeled_arrays(train, "train")
    test_images, test_labels = _labeled_arrays(test, "test")
    _check_same_classes(train, test)
    num_classes = max(
        int(train_labels.max()) + 1,
        int(test_labels.max()) + 1,
        *(n for n in (_declared_classes(train), _declared_classes(test)) if n is not None),
    )
    device = resolve_device(config.device)
    torch = require("torch", "evaluation")
    model = _on_device(encoder, device, torch)  # copy once, not once per split
    train_emb = embed(model, train_images, batch_size=config.batch_size, device=device)
    test_emb = embed(model, test_images, batch_size=config.batch_size, device=device)
    health = embedding_health(train_emb)
    knn = {
        k: knn_top1(
            train_emb,
            train_labels,
            test_emb,
            test_labels,
            k=k,
            temperature=config.knn_temperature,
            num_classes=num_classes,
        )
        for k in config.knn_k
    }
    probe = (
        linear_probe_top1(
            train_emb,
            train_labels,
            test_emb,
            test_labels,
            seed=config.seed,
            max_iter=config.probe_max_iter,
        )
        if config.probe
        else None
    )
    return EvalResult(
        knn_top1=knn,
        linear_probe_top1=probe,
        health=health,
        num_train=len(train_labels),
        num_test=len(test_labels),
        num_classes=num_classes,
        seconds=time.perf_counter() - started,
    )


def _labeled_arrays(dataset: Any, role: str) -> tuple[np.ndarray, np.ndarray]:
    images = getattr(dataset, "images", None)
    if images is None:
        raise DataError(
            f"the {role} data ({type(dataset).__name__}) has no .images; evaluation needs an "
            f"edge_ssl.data.ImageDataset (uint8 images (N, H, W, 3) with labels)."
        )
    images = np.asarray(images)
    if len(images) == 0:
        raise DataError(
            f"the {role} data{_describe(dataset)} is empty (0 images); evaluation needs "
            f"labeled images in both train and test data."
        )
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise DataError(
            f"evaluation needs class labels, but the {role} data{_describe(dataset)} has "
            f"none: kNN and linear-probe accuracy are measured against them. Use a labeled "
            f"source: {_LABELED_SOURCES}."
        )
    labels = _check_labels(f"{role} labels", labels, len(images))
    return images, labels


def _describe(dataset: Any) -> str:
    for attribute in ("source", "path", "name"):
        value = getattr(dataset, attribute, None)
        if isinstance(value, str) or hasattr(value, "__fspath__"):
            return f" ({value})"
    return ""


def _declared_classes(dataset: Any) -> int | None:
    value = getattr(dataset, "num_classes", None)
    return int(value) if isinstance(value, numbers.Integral) else None


def _check_same_classes(train: Any, test: Any) -> None:
    train_names = getattr(train, "class_names", None)
    test_names = getattr(test, "class_names", None)
    if train_names is None or test_names is None:
        return
    train_names, test_names = [str(n) for n in train_names], [str(n) for n in test_names]
    if train_names != test_names:
        raise DataError(
            f"train and test data name their classes differently (train: {train_names}, "
            f"test: {test_names}), so label ids would not mean the same class. Use two "
            f"splits of one labeled source with the same class folders."
        )


# --------------------------------------------------------------------------- checks / helpers


def _check_split(
    train_emb: Any, train_labels: Any, test_emb: Any, test_labels: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train_emb = _check_embeddings("train embeddings", train_emb)
    test_emb = _check_embeddings("test embeddings", test_emb)
    if train_emb.shape[1] != test_emb.shape[1]:
        raise DataError(
            f"train and test embeddings differ in size: {train_emb.shape[1]} vs "
            f"{test_emb.shape[1]}. Embed both with the same encoder."
        )
    train_labels = _check_labels("train labels", train_labels, len(train_emb))
    test_labels = _check_labels("test labels", test_labels, len(test_emb))
    return train_emb, train_labels, test_emb, test_labels


def _check_embeddings(name: str, embeddings: Any) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2 or 0 in x.shape:
        raise DataError(f"{name} must be a non-empty (N, D) array; got shape {x.shape}.")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name} must be real numbers; got dtype {x.dtype}.")
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DataError(
            f"{name} contain {bad} NaN/inf values. An encoder whose training diverged produces "
            f"them: check the pretraining loss, or evaluate an earlier checkpoint."
        )
    return x


def _check_labels(name: str, labels: Any, count: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != count:
        raise DataError(f"{name} must be a 1-D array of {count} labels; got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must be integer class ids; got dtype {y.dtype}.")
    if y.min() < 0:
        raise DataError(f"{name} must be >= 0; got {int(y.min())}.")
    return y.astype(np.int64, copy=False)


def _num_classes_for(train: np.ndarray, test: np.ndarray, num_classes: int | None) -> int:
    needed = int(max(train.max(), test.max())) + 1
    if num_classes is None:
        return needed
    num_classes = _positive_int("knn_top1 num_classes", num_classes)
    if num_classes < needed:
        raise DataError(
            f"labels go up to {needed - 1} but num_classes={num_classes}; pass "
            f"num_classes >= {needed} or None to infer it."
        )
    return num_classes


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, _NORM_EPS)


# --------------------------------------------------------------------------- bundles

def load_eval_data(
    data: Any,
    test_data: Any = None,
    *,
    limit: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Labeled (train, test) sets for evaluation.

    With ``test_data`` the two are loaded as given. Otherwise a source with a natural
    split (the embedded default, a cifar-10-batches-py folder) uses it, and any other
    source is split stratified into ``1 - test_fraction`` / ``test_fraction``.
    """
    from edge_ssl.data import detect_format, load_images, split_dataset

    if test_data is not None:
        return load_images(data, split="train", limit=limit), load_images(test_data, split="test")
    single = data[0] if isinstance(data, (list, tuple)) and len(data) == 1 else data
    is_path = isinstance(single, str) or hasattr(single, "__fspath__")
    natural = single is None or (is_path and detect_format(single) == "cifar10-python")
    if natural:
        return load_images(single, split="train", limit=limit), load_images(single, split="test")
    train, test = split_dataset(load_images(data), test_fraction=test_fraction, seed=seed)
    return (train.subset(range(min(limit, len(train)))) if limit else train), test


def evaluate_bundle(
    bundle_path: Any,
    data: Any,
    test_data: Any = None,
    config: EvalConfig = EvalConfig(),
    *,
    limit: int | None = None,
) -> tuple[EvalResult, Any]:
    """Evaluate a bundle's encoder and record the result beside it (keyed by manifest sha256).

    Returns the result and the results file path. The bundle itself is never modified.
    """
    from edge_ssl.bundle import Bundle, record_results
    from edge_ssl.config import config_to_dict
    from edge_ssl.models import load_encoder

    bundle = Bundle.open(bundle_path, verify=True)
    encoder = load_encoder(bundle)
    train, test = load_eval_data(data, test_data, limit=limit, seed=config.seed)
    result = evaluate_encoder(encoder, train, test, config)
    record = result.to_dict() | {
        "train_data": train.source,
        "test_data": test.source,
        "config": config_to_dict(config),
    }
    return result, record_results(bundle, "eval", record)
