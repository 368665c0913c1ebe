"""`edge-ssl adapt INT8.edge --out OUT --resume`: an interrupted adaptation of a quantized bundle
(its float weights train at OUT.stages/adapt.edge, checkpointed beside them) continues and ends
re-quantized; --resume with nothing to continue is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ssl.adapt.api import adapt
from edge_ssl.adapt.inputs import checkpoint_path
from edge_ssl.adapt.requantize import float_out
from edge_ssl.adapt.tune import adapt_config_for
from edge_ssl.bundle import Bundle
from edge_ssl.data.sources import ImageDataset

#: The options both the interrupted run and `edge-ssl adapt ... --resume` use.
SETTINGS = {"trainable": "bias", "steps": 6, "batch_size": 8, "budget_mb": None, "method": "simsiam",
            "device": "cpu", "checkpoint_every": 1, "guard_every": 2, "head_dim": 32}
CLI_OPTIONS = ["--trainable", "bias", "--steps", "6", "--batch-size", "8", "--device", "cpu",
               "--opt", "checkpoint_every=1", "--opt", "guard_every=2", "--opt", "head_dim=32"]


def int8_bundle(folder: Path) -> tuple[Bundle, np.ndarray]:
    """A tiny float bundle quantized to INT8 beside it (so its float parent is found), and 48
    local images for adapting it."""
    from edge_ssl.compress.quantize import QuantizeConfig, quantize

    from tests.test_compress_fixtures import tiny_images, write_tiny_bundle

    parent = write_tiny_bundle(folder / "float.edge", width=0.125)
    images = tiny_images(48, seed=1)
    quantized = quantize(parent, QuantizeConfig(calibration_images=16), images[:16], folder / "int8.edge")
    return quantized.bundle, images


class Interrupt:
    """A progress callback that stops the run like Ctrl-C after ``after`` steps."""

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, event) -> None:
        if event.phase == "step" and event.step >= self.after:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An INT8 adaptation stopped after 3 of 6 steps: (folder, deployed INT8 bundle, OUT)."""
    folder = tmp_path_factory.mktemp("resume-int8")
    deployed, images = int8_bundle(folder)
    np.savez(folder / "local.npz", x=images)
    out = folder / "adapted.edge"
    config = adapt_config_for(deployed, SETTINGS)  # what the command line builds
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        adapt(deployed, ImageDataset(images, None, None, "local"), out, config, progress=Interrupt(3))
    return folder, deployed, out


def _adapt(*args: str, capsys) -> tuple[int, str, str]:
    from edge_ssl.cli import main

    with pytest.raises(SystemExit) as done:
        main(["adapt", *args])
    captured = capsys.readouterr()
    return done.value.code or 0, captured.out, captured.err


def test_the_interrupted_run_checkpoints_beside_its_float_weights(interrupted):
    _, _, out = interrupted
    ckpt = checkpoint_path(float_out(out))
    assert torch.load(ckpt, weights_only=True)["step"] == 2  # stopped during step 3's report
    assert not out.exists() and not float_out(out).exists()


def test_a_fresh_run_over_the_checkpoint_is_refused_and_names_resume(interrupted, capsys):
    folder, deployed, out = interrupted
    code, _, err = _adapt(str(deployed.path), "--data", str(folder / "local.npz"), "--out", str(out),
                          *CLI_OPTIONS, capsys=capsys)
    assert code != 0 and "--resume" in err and "interrupted" in err
    assert checkpoint_path(float_out(out)).exists()  # nothing was lost


def test_resume_with_nothing_to_continue_is_refused_before_any_work(interrupted, capsys):
    folder, deployed, _ = interrupted
    other = folder / "other.edge"
    code, _, err = _adapt(str(deployed.path), "--data", str(folder / "local.npz"), "--out", str(other),
                          *CLI_OPTIONS, "--resume", capsys=capsys)
    assert code != 0 and "no checkpoint" in err and "without --resume" in err
    assert not other.exists() and not float_out(other).parent.exists()


def test_resume_continues_the_checkpoint_and_writes_int8_again(interrupted, capsys):
    folder, deployed, out = interrupted
    code, stdout, err = _adapt(str(deployed.path), "--data", str(folder / "local.npz"), "--out",
                               str(out), *CLI_OPTIONS, "--resume", "--json", capsys=capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["steps_done"] == 6
    adapted = Bundle.open(out)
    assert adapted.manifest.precision == "int8" and not adapted.has("model.pt")
    assert adapted.manifest.lineage[-1].stage == "quantize"
    trained = Bundle.open(float_out(out)).manifest.lineage[-1].settings
    assert trained["resumed"] is True and trained["steps_done"] == 6
    assert not checkpoint_path(float_out(out)).parent.exists()  # removed once the run finished
