"""The one safe torch reader: weights_only torch.load or safetensors, with errors that name the fix."""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_ssl.errors import CheckpointError

# Globals whose only purpose in a pickle is to run something: never suggest loading such a file.
_DANGEROUS_MODULES = frozenset(
    {
        "os",
        "posix",
        "nt",
        "subprocess",
        "builtins",
        "__builtin__",
        "sys",
        "shutil",
        "socket",
        "runpy",
        "importlib",
        "pty",
        "webbrowser",
        "code",
        "ctypes",
        "marshal",
        "pickle",
        "_pickle",
        "commands",
    }
)

# --- reading --------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; everything else with
    ``torch.load(weights_only=True, map_location="cpu")``. A file that needs full unpickling
    (an ``argparse.Namespace``, a pickled model, a malicious ``__reduce__``) is refused with a
    CheckpointError that says how to re-save its weights; there is no unsafe fallback.
    """
    loaded = load_torch_file(path)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(loaded).__name__}, not a checkpoint (a dict of names -> "
            "tensors). Save model.state_dict() with torch.save."
        )
    return dict(loaded)


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True, map_location='cpu')`` (or safetensors) with clear errors.

    The one torch reader of the project: checkpoint import, ``load_state_dict_file`` and
    pretraining resume all come here, so there is no unsafe or unhandled load anywhere.
    """
    import torch

    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"checkpoint {file} does not exist. Check the path.")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file} is not a file; pass the checkpoint file itself.")
    if file.suffix == ".safetensors" or _looks_like_safetensors(file):
        return _read_safetensors(file)
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _unpickling_failure(file, exc) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... on broken files
        raise _corrupt(file, exc) from exc
    return loaded


def _looks_like_safetensors(file: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    with file.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= file.stat().st_size - 8


def _read_safetensors(file: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(file), device="cpu"))
    except Exception as exc:  # SafetensorError, OSError, ...
        raise _corrupt(file, exc) from exc


def _corrupt(file: Path, exc: BaseException, reason: str = "") -> CheckpointError:
    if not reason:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
        # torch's messages run on for lines; their first sentence names the problem.
        reason = text.splitlines()[0].split(". ")[0][:200] if text else "unexpected end of file"
    return CheckpointError(
        f"{file}: cannot be read as a checkpoint ({type(exc).__name__}: {reason}). "
        "It is truncated, corrupt or not a torch.save/safetensors file; re-download or re-save it."
    )


def _unpickling_failure(file: Path, exc: pickle.UnpicklingError) -> CheckpointError:
    text = str(exc)
    if "Weights only load failed" not in text:
        return _corrupt(file, exc)
    names = _unsafe_globals(file, text)
    if names is None:
        return _corrupt(file, exc, "the pickled data ends early or is damaged")
    shown = ", ".join(names) if names else "objects outside the weights-only allowlist"
    if any(name.split(".")[0] in _DANGEROUS_MODULES for name in names):
        return CheckpointError(
            f"{file}: REFUSED. Unpickling it would call {shown}, which runs programs or touches "
            "the system; a weights file never needs that, so the file is probably malicious. "
            "Do not load it with weights_only=False; get the weights from a source you trust."
        )
    if "argparse.Namespace" in names:
        how = (
            "ck.pop('args', None); torch.save(ck, 'weights.pt')  "
            "(DINO, MoCo and timm training scripts store their argparse 'args' in the checkpoint)"
        )
    elif any(name.startswith("torch.nn.") for name in names):
        how = "torch.save(ck.state_dict(), 'weights.pt')  (the file holds a whole pickled model)"
    else:
        how = "torch.save(ck['state_dict'], 'weights.pt')  (keep only the dict of tensors)"
    return CheckpointError(
        f"{file}: refused. It is not a plain weights file: loading it needs full unpickling of "
        f"{shown}, and full unpickling can run arbitrary code, so edge-ssl only loads "
        "checkpoints with torch.load(weights_only=True). If you trust where the file came from, "
        "re-save its weights in a separate Python session: "
        f"ck = torch.load('{file}', map_location='cpu', weights_only=False); {how}; "
        "then import weights.pt."
    )


def _unsafe_globals(file: Path, text: str) -> list[str] | None:
    """Globals a weights-only load refused, or None when the file is broken rather than unsafe."""
    from_text = list(dict.fromkeys(re.findall(r"GLOBAL ([A-Za-z_][\w.]*)", text)))
    import torch

    if zipfile.is_zipfile(file):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception:  # a broken archive
            return None
        return sorted(found) or from_text
    # Legacy (pre-1.6) format: magic, protocol, sys-info and the object, each a complete pickle.
    # A truncated file fails mid-pickle with a mangled global name, which is not a safety issue.
    try:
        with file.open("rb") as handle:
            for _ in range(4):
                for _op in pickletools.genops(handle):
                    pass
    except Exception:
        return None
    return from_text


