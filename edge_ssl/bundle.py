"""The bundle: a directory with manifest.json and files, written atomically, verified on open."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.environment import describe_environment
from edge_ssl.errors import BundleError, BundleIntegrityError
from edge_ssl.outputs import check_bundle_out, move_into_place
from edge_ssl.spec import EncoderSpec, InputSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.pt"
BUNDLE_SUFFIX = ".edge"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mixed")
#: Files a bundle derived by export or quantize carries over from its parent unchanged: the
#: adaptation settings and clean replay images that `edge-ssl adapt` reads on the device.
CARRIED_FILES = ("adapt_settings.json", "adapt_replay.npz")
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of one file in the bundle."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class LineageEntry:
    """One stage that produced a bundle: what ran, with which settings, from which parent."""

    stage: str
    settings: Mapping[str, Any]
    parent: str | None  # sha256 of the parent's manifest.json, None for a root
    parent_name: str | None
    time: str
    environment: Mapping[str, Any]
    parent_path: str | None = None  # where the parent lived when this stage ran (a hint only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "settings": dict(self.settings),
            "parent": self.parent,
            "parent_name": self.parent_name,
            "parent_path": self.parent_path,
            "time": self.time,
            "environment": dict(self.environment),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LineageEntry:
        return cls(
            stage=data["stage"],
            settings=dict(data.get("settings", {})),
            parent=data.get("parent"),
            parent_name=data.get("parent_name"),
            time=data["time"],
            environment=dict(data.get("environment", {})),
            parent_path=data.get("parent_path"),
        )


def lineage_entry(
    stage: str, settings: Mapping[str, Any], parent: Bundle | None = None
) -> LineageEntry:
    """A lineage entry for ``stage`` run now on this host, pointing at ``parent``."""
    return LineageEntry(
        stage=stage,
        settings=dict(settings),
        parent=parent.manifest_sha256 if parent else None,
        parent_name=parent.manifest.name if parent else None,
        time=utc_now(),
        environment=describe_environment(),
        parent_path=str(parent.path.resolve()) if parent else None,
    )


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild, trust and trace a bundle, without pickles."""

    name: str
    encoder: EncoderSpec
    precision: str = "fp32"
    files: Mapping[str, FileRecord] = field(default_factory=dict)
    lineage: tuple[LineageEntry, ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def input(self) -> InputSpec:
        return self.encoder.input

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "encoder": {
                "factory": self.encoder.factory,
                "arch": self.encoder.arch,
                "kwargs": dict(self.encoder.kwargs),
            },
            "input": self.encoder.input.to_dict(),
            "embed_dim": self.encoder.embed_dim,
            "precision": self.precision,
            "files": {
                name: {"sha256": rec.sha256, "bytes": rec.bytes}
                for name, rec in sorted(self.files.items())
            },
            "lineage": [entry.to_dict() for entry in self.lineage],
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        version = data.get("schema_version") if isinstance(data, Mapping) else None
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{source}: schema_version {version!r} is not supported; this edge-ssl reads "
                f"schema {SCHEMA_VERSION}. Re-create the bundle with this version of edge-ssl."
            )
        try:
            encoder = data["encoder"]
            spec = EncoderSpec(
                arch=encoder["arch"],
                kwargs=dict(encoder.get("kwargs", {})),
                factory=encoder.get("factory", "edge_ssl.models.create_encoder"),
                input=InputSpec.from_dict(data["input"]),
                embed_dim=int(data["embed_dim"]),
            )
            return cls(
                name=str(data["name"]),
                encoder=spec,
                precision=data.get("precision", "fp32"),
                files={
                    name: FileRecord(sha256=rec["sha256"], bytes=int(rec["bytes"]))
                    for name, rec in data.get("files", {}).items()
                },
                lineage=tuple(LineageEntry.from_dict(e) for e in data.get("lineage", [])),
                metrics=dict(data.get("metrics", {})),
                schema_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"{source} is malformed: {type(exc).__name__}: {exc}. "
                "The manifest was edited by hand or written by another tool."
            ) from exc


def _canonical_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


class Bundle:
    """A read-only view of a bundle directory; open with ``Bundle.open(path)``."""

    def __init__(self, path: Path, manifest: Manifest, manifest_sha256: str) -> None:
        self.path = path
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, name={self.manifest.name!r})"

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Read manifest.json; with ``verify`` re-hash every file and name any bad one."""
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle {str(root)!r} does not exist.")
        if not root.is_dir():
            raise BundleError(
                f"{str(root)!r} is not a bundle directory (a NAME{BUNDLE_SUFFIX}/ folder with "
                f"{MANIFEST_NAME}); for a shipped .tar use edge_ssl.bundle.unpack_bundle first."
            )
        manifest_path = root / MANIFEST_NAME
        try:
            raw = manifest_path.read_bytes()
        except FileNotFoundError:
            raise BundleError(
                f"{str(root)!r} has no {MANIFEST_NAME}; it is not an edge-ssl bundle."
            ) from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleIntegrityError(
                f"{manifest_path} is not valid JSON ({exc}); the bundle is corrupt."
            ) from None
        manifest = Manifest.from_dict(data, source=str(manifest_path))
        bundle = cls(root, manifest, hashlib.sha256(raw).hexdigest())
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check each recorded file's size and sha256; raise naming the first bad file."""
        for name, record in self.manifest.files.items():
            path = self.path / name
            if not path.is_file():
                raise BundleIntegrityError(f"{path} is listed in the manifest but missing.")
            size = path.stat().st_size
            if size != record.bytes:
                raise BundleIntegrityError(
                    f"{path} has {size} bytes, the manifest records {record.bytes}: "
                    "the file is truncated or was replaced."
                )
            digest = sha256_file(path)
            if digest != record.sha256:
                raise BundleIntegrityError(
                    f"{path} sha256 {digest[:16]}... does not match the manifest's "
                    f"{record.sha256[:16]}...: the file is corrupt or was modified."
                )

    def file(self, name: str) -> Path:
        """Path of a file the manifest lists; BundleError when the bundle has no such file."""
        if name not in self.manifest.files:
            have = ", ".join(sorted(self.manifest.files)) or "none"
            raise BundleError(f"bundle {self.path} has no {name!r} (files: {have}).")
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest.files

    def child_lineage(self, stage: str, settings: Mapping[str, Any]) -> tuple[LineageEntry, ...]:
        """This bundle's lineage plus an entry for a stage that derives a new bundle from it."""
        return (*self.manifest.lineage, lineage_entry(stage, settings, parent=self))


class BundleWriter:
    """Builds a bundle in a hidden temp dir next to ``out`` and renames it into place.

    Use as a context manager: on any error the temp dir is removed and ``out`` (even
    an existing bundle being overwritten) is left as it was.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out = Path(out)
        check_bundle_out(self.out, overwrite=overwrite)
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
            self.tmp.mkdir()
        except OSError as exc:
            raise BundleError(f"cannot create a bundle in {parent}: {exc}") from exc
        self._committed = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._committed:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path_for(self, name: str) -> Path:
        """Where to write bundle file ``name`` (a relative path such as 'bench/cpu.json')."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or name == MANIFEST_NAME:
            raise BundleError(
                f"invalid bundle file name {name!r}: use a relative path inside the bundle "
                f"other than {MANIFEST_NAME}."
            )
        target = self.tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, name: str, data: bytes) -> Path:
        target = self.path_for(name)
        self._guard(name, lambda: target.write_bytes(data))
        return target

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_bytes(name, _canonical_json(obj))

    def copy_file(self, name: str, source: str | os.PathLike) -> Path:
        target = self.path_for(name)
        self._guard(name, lambda: shutil.copyfile(source, target))
        return target

    def save_state_dict(self, state_dict: Mapping[str, Any], name: str = WEIGHTS_NAME) -> Path:
        """torch.save a plain tensor dict (loadable with weights_only=True)."""
        import torch

        target = self.path_for(name)
        plain = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        self._guard(name, lambda: torch.save(plain, target))
        return target

    def _guard(self, name: str, write: Any) -> None:
        try:
            write()
        except OSError as exc:
            raise BundleError(
                f"could not write {name} for bundle {self.out}: {exc.strerror or exc} "
                "(is the disk full?). Nothing was changed at the destination."
            ) from exc

    def commit(
        self,
        *,
        name: str,
        encoder: EncoderSpec,
        lineage: tuple[LineageEntry, ...],
        precision: str = "fp32",
        metrics: Mapping[str, Any] | None = None,
    ) -> Bundle:
        """Hash every written file, write manifest.json, and move the bundle into place."""
        if precision not in PRECISIONS:
            raise BundleError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
        files = {}
        for path in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(self.tmp).as_posix()
            files[rel] = FileRecord(sha256=sha256_file(path), bytes=path.stat().st_size)
        manifest = Manifest(
            name=name,
            encoder=encoder,
            precision=precision,
            files=files,
            lineage=lineage,
            metrics=dict(metrics or {}),
        )
        raw = _canonical_json(manifest.to_dict())
        self._guard(MANIFEST_NAME, lambda: _write_synced(self.tmp / MANIFEST_NAME, raw))
        self._swap_into_place()
        self._committed = True
        return Bundle(self.out, manifest, hashlib.sha256(raw).hexdigest())

    def _swap_into_place(self) -> None:
        try:
            move_into_place({self.tmp: self.out})
        except OSError as exc:
            raise BundleError(f"could not move the new bundle into {self.out}: {exc}") from exc


def write_encoder_bundle(
    out: str | os.PathLike,
    encoder: Any,
    *,
    lineage: tuple[LineageEntry, ...],
    metrics: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
    precision: str = "fp32",
    overwrite: bool = False,
) -> Bundle:
    """The one way to write a float encoder bundle: ``model.pt`` + manifest, atomically.

    ``encoder`` is an ``edge_ssl.models.Encoder`` (its ``spec`` goes into the manifest);
    ``extra_files`` maps bundle file names to local files copied in (e.g. ``model.onnx``).
    Used by import, pretrain, and every compression and adaptation stage.
    """
    out = Path(out)
    with BundleWriter(out, overwrite=overwrite) as writer:
        writer.save_state_dict(encoder.state_dict())
        for name, source in (extra_files or {}).items():
            writer.copy_file(name, source)
        return writer.commit(
            name=out.name.removesuffix(BUNDLE_SUFFIX),
            encoder=encoder.spec,
            lineage=lineage,
            precision=precision,
            metrics=metrics,
        )


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename: readers never see half a file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def results_path(bundle: Bundle | str | os.PathLike) -> Path:
    """The results file beside a bundle: ``NAME.edge`` -> ``NAME.edge.results.json``."""
    root = bundle.path if isinstance(bundle, Bundle) else Path(bundle)
    return root.with_name(root.name + ".results.json")


def read_results(bundle: Bundle) -> dict[str, Any]:
    """The results recorded for this exact bundle (keyed by its manifest sha256)."""
    path = results_path(bundle)
    if not path.exists():
        return {}
    return _load_results_file(path).get(bundle.manifest_sha256, {})


def record_results(
    bundle: Bundle, key: str, results: Mapping[str, Any], path: str | os.PathLike | None = None
) -> Path:
    """Store ``results`` under ``key`` for this bundle's manifest sha256; atomic write.

    Results live beside the bundle (or at ``path``), never inside it: bundles are not
    modified in place.
    """
    path = results_path(bundle) if path is None else Path(path)
    data = _load_results_file(path) if path.exists() else {}
    entry = dict(data.get(bundle.manifest_sha256, {}))
    entry["bundle_name"] = bundle.manifest.name
    entry[key] = dict(results)
    data[bundle.manifest_sha256] = entry
    try:
        atomic_write_bytes(path, _canonical_json(data))
    except OSError as exc:
        raise BundleError(f"could not write results to {path}: {exc}") from exc
    return path


def _load_results_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"results file {path} is unreadable ({exc}); move it aside to start a new one."
        ) from None
    if not isinstance(data, dict):
        raise BundleError(f"results file {path} does not hold a JSON object; move it aside.")
    return data


def pack_bundle(bundle: Bundle, tar_path: str | os.PathLike) -> Path:
    """Write the bundle as an uncompressed .tar (for shipping), atomically."""
    target = Path(tar_path)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tarfile.open(tmp, "w") as tar:
            tar.add(bundle.path, arcname=bundle.path.name)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"could not write {target}: {exc}") from exc
    return target


def unpack_bundle(tar_path: str | os.PathLike, dest_dir: str | os.PathLike) -> Bundle:
    """Extract a shipped bundle .tar safely (no links, no paths outside) and verify it."""
    source = Path(tar_path)
    dest = Path(dest_dir)
    try:
        with tarfile.open(source, "r") as tar:
            members = tar.getmembers()
            roots = {Path(m.name).parts[0] for m in members if m.name}
            if len(roots) != 1:
                raise BundleError(f"{source} must hold exactly one bundle directory; found {sorted(roots)}.")
            root = roots.pop()
            staging = dest / f".{root}.unpack-{uuid.uuid4().hex[:8]}"
            staging.mkdir(parents=True)
            try:
                tar.extractall(staging, filter="data")
                bundle = Bundle.open(staging / root, verify=True)
                final = dest / root
                if final.exists():
                    raise BundleError(f"{final} already exists; remove it or unpack elsewhere.")
                os.replace(staging / root, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleIntegrityError(f"{source} is not a readable bundle tar: {exc}") from exc
    return Bundle(final, bundle.manifest, bundle.manifest_sha256)


def carried_files(bundle: Bundle) -> dict[str, Path]:
    """The CARRIED_FILES ``bundle`` holds, by name (for export and quantize to copy in)."""
    return {name: bundle.file(name) for name in CARRIED_FILES if bundle.has(name)}
