"""Evaluate frozen encoders: weighted kNN, linear probe and embedding-collapse health."""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_ssl.config import check_flag, check_int, check_number, setting_label
from edge_ssl.errors import ConfigError, DataError, EdgeSSLError
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
_MAX_SEED = 2**32 - 1  # numpy / scikit-learn random_state bound
_TEMPERATURE_HINT = (
    " 0.07 is the usual kNN temperature (Wu et al. 2018, DINO); lower values trust the "
    "closest neighbours more."
)
_LABELED_SOURCES = (
    "an image folder with one subfolder per class (root/<class>/*.png) or an .npz file "
    "holding labels 'y' next to the images 'x' (e.g. ../shared/data/cifar10/cifar10_test.npz)"
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
        from edge_ssl.device import parse_device_name

        owner = "EvalConfig"
        if not isinstance(self.knn_k, (tuple, list)) or not self.knn_k:
            raise ConfigError(
                f"{setting_label(owner, 'knn_k')} must be a non-empty tuple of neighbour counts; "
                f"got {self.knn_k!r}. Write e.g. knn_k=(20, 200), or knn_k=(20,) for one k."
            )
        ks = tuple(check_int(owner, "knn_k", k) for k in self.knn_k)
        if len(set(ks)) != len(ks):
            raise ConfigError(f"{setting_label(owner, 'knn_k')} has duplicates: {ks}. List each once.")
        object.__setattr__(self, "knn_k", ks)
        object.__setattr__(self, "knn_temperature", _temperature(owner, "knn_temperature", self.knn_temperature))
        object.__setattr__(self, "probe", check_flag(owner, "probe", self.probe))
        check_int(owner, "probe_max_iter", self.probe_max_iter)
        check_int(owner, "batch_size", self.batch_size)
        parse_device_name(self.device)
        check_int(owner, "seed", self.seed, 0, _MAX_SEED)


def _temperature(owner: str, name: str, value: Any) -> float:
    try:
        number = check_number(owner, name, value, 0, low_open=True)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{_TEMPERATURE_HINT}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{setting_label(owner, name)} must be finite; got {value!r}.{_TEMPERATURE_HINT}")
    return number


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
    """Deprecated alias: the device name :func:`edge_ssl.device.resolve_device` resolves to."""
    from edge_ssl.device import resolve_device as resolve

    return str(resolve(device))


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
    batch_size = check_int("embed", "batch_size", batch_size)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"embed expects uint8 images shaped (N, H, W, 3); got {images.dtype} "
            f"{tuple(images.shape)}. Load images through edge_ssl.data.sources, which yields that layout."
        )
    if len(images) == 0:
        return np.empty((0, spec.embed_dim), dtype=np.float32)
    from edge_ssl.device import resolve_device as resolve

    resolved = device if isinstance(device, torch.device) else resolve(device)
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


def _on_device(encoder: torch.nn.Module, target: torch.device, torch: Any) -> torch.nn.Module:
    """``encoder`` if all its tensors are on ``target`` (an indexed device), else a moved copy."""
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
    k = check_int("knn_top1", "k", k)
    temperature = _temperature("knn_top1", "temperature", temperature)
    chunk = check_int("knn_top1", "chunk", chunk)
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
    max_iter = check_int("linear_probe_top1", "max_iter", max_iter)
    seed = check_int("linear_probe_top1", "seed", seed, 0, _MAX_SEED)
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

    ``train``/``test`` are :class:`edge_ssl.data.sources.ImageDataset`-like: ``.images`` uint8
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
    from edge_ssl.device import resolve_device as resolve

    device = resolve(config.device)
    torch = require("torch", "evaluation")
    model = _on_device(encoder, device, torch)  # copy once, not once per split
    train_emb = embed(model, train_images, batch_size=config.batch_size, device=device)
    test_emb = embed(model, test_images, batch_size=config.batch_size, device=device)
    knn = {k: knn_top1(train_emb, train_labels, test_emb, test_labels, k=k,
                       temperature=config.knn_temperature, num_classes=num_classes)
           for k in config.knn_k}
    probe = None
    if config.probe:
        probe = linear_probe_top1(train_emb, train_labels, test_emb, test_labels, seed=config.seed,
                                  max_iter=config.probe_max_iter)
    return EvalResult(
        knn_top1=knn, linear_probe_top1=probe, health=embedding_health(train_emb),
        num_train=len(train_labels), num_test=len(test_labels), num_classes=num_classes,
        seconds=time.perf_counter() - started,
    )


def _labeled_arrays(dataset: Any, role: str) -> tuple[np.ndarray, np.ndarray]:
    images = getattr(dataset, "images", None)
    if images is None:
        raise DataError(
            f"the {role} data ({type(dataset).__name__}) has no .images; evaluation needs an "
            f"edge_ssl.data.sources.ImageDataset (uint8 images (N, H, W, 3) with labels)."
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
    num_classes = check_int("knn_top1", "num_classes", num_classes)
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
    image_size: int | None = None,
) -> tuple[Any, Any]:
    """Labeled (train, test) sets for evaluation.

    With ``test_data`` the two are loaded as given. Otherwise a source with a natural
    split (the embedded default, a cifar-10-batches-py folder) uses it, and any other
    source is split stratified into ``1 - test_fraction`` / ``test_fraction``.
    """
    from edge_ssl.data.sources import detect_format, load_images, split_dataset

    if limit is not None:
        check_int("evaluate", "limit", limit)
    size = {"image_size": image_size}
    if test_data is not None:
        return (
            load_images(data, split="train", limit=limit, **size),
            load_images(test_data, split="test", **size),
        )
    single = data[0] if isinstance(data, (list, tuple)) and len(data) == 1 else data
    is_path = isinstance(single, str) or hasattr(single, "__fspath__")
    natural = single is None or (is_path and detect_format(single) == "cifar10-python")
    if natural:
        return (
            load_images(single, split="train", limit=limit, **size),
            load_images(single, split="test", **size),
        )
    train, test = split_dataset(load_images(data, **size), test_fraction=test_fraction, seed=seed)
    return (train.subset(range(min(limit, len(train)))) if limit else train), test


def results_target(bundle_path: Any, results: Any = None) -> Path | None:
    """Where eval results will be saved, checked before any work.

    An explicit ``results`` file must be writable (ConfigError naming --results otherwise);
    the default file beside the bundle is skipped (None) when its folder is read-only, so
    the metrics are still computed and shown.
    """
    from edge_ssl.bundle import results_path

    if results is not None:
        target = Path(results)
        if target.is_dir() or not _writable(target):
            raise ConfigError(
                f"--results {target}: cannot write a results file there; give a writable file path."
            )
        return target
    target = results_path(bundle_path)
    return target if _writable(target) else None


def _writable(target: Path) -> bool:
    import os

    if target.is_dir():
        return False
    if target.exists():
        return os.access(target, os.W_OK) and os.access(target.parent, os.W_OK)
    return target.parent.is_dir() and os.access(target.parent, os.W_OK | os.X_OK)


def evaluate_bundle(
    bundle_path: Any,
    data: Any,
    test_data: Any = None,
    config: EvalConfig = EvalConfig(),
    *,
    limit: int | None = None,
    image_size: int | None = None,
    results: Any = None,
) -> tuple[EvalResult, Path | None]:
    """Evaluate a bundle's encoder and record the result (keyed by the manifest sha256).

    Results go to ``results`` or, by default, ``NAME.edge.results.json`` beside the
    bundle. Returns the result and the file written, or None when the default location
    is read-only (the metrics are still returned). The bundle itself is never modified.
    """
    from edge_ssl.bundle import Bundle, record_results
    from edge_ssl.config import config_to_dict
    from edge_ssl.models import load_encoder

    if limit is not None:
        check_int("evaluate", "limit", limit)
    bundle = Bundle.open(bundle_path, verify=True)
    target = results_target(bundle.path, results)
    encoder = load_encoder(bundle)
    train, test = load_eval_data(data, test_data, limit=limit, seed=config.seed, image_size=image_size)
    result = evaluate_encoder(encoder, train, test, config)
    record = result.to_dict() | {
        "train_data": train.source,
        "test_data": test.source,
        "config": config_to_dict(config),
    }
    if target is None:
        return result, None
    try:
        return result, record_results(bundle, "eval", record, path=target)
    except EdgeSSLError:
        if results is not None:
            raise
        return result, None  # the default location went read-only meanwhile: keep the metrics
