"""Issue 5, section 5: bad outputs and flags are refused before the work, through the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_ssl.cli import app, main

TINY = ["--method", "simclr", "--arch", "resnet18_cifar", "--arch-opt", "width=0.125",
        "--batch-size", "8", "--steps-per-epoch", "1", "--epochs", "1", "--warmup-epochs", "0"]
MISSING_DATA = ["--data", "/no/such/data.npz"]  # reading it would fail: the out check must come first


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def labeled_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), y=np.arange(40) % 2)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, labeled_npz):
    from edge_ssl.data.sources import load_images
    from edge_ssl.train.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("b") / "t.edge"
    config = PretrainConfig(method="simclr", arch_kwargs={"width": 0.125}, batch_size=8, epochs=1,
                            steps_per_epoch=1, warmup_epochs=0.0)
    pretrain(config, load_images(str(labeled_npz)), out)
    return out


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# --------------------------------------------------------------------------- outputs


def test_pretrain_out_in_an_unwritable_place_fails_before_reading_data(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run(capsys, "pretrain", "--out", str(blocker / "t.edge"), *MISSING_DATA, *TINY)
    _one_line_error(code, err, "cannot write to", "--out")


def test_pretrain_overwrite_refuses_a_non_bundle_before_reading_data(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "pretrain", "--out", str(folder), "--overwrite", *MISSING_DATA, *TINY)
    _one_line_error(code, err, "is not a bundle")
    assert (folder / "keep.txt").read_text() == "mine"


def test_demo_out_that_is_a_file_fails_before_training(tmp_path, capsys):
    target = tmp_path / "demo.txt"
    target.write_text("x")
    code, _, err = run(capsys, "demo", "--out", str(target), "--epochs", "1")
    assert code == 1 and err.strip().startswith("error: ") and str(target) in err, err
    assert target.read_text() == "x"


def test_import_checks_out_before_reading_the_checkpoint(tmp_path, capsys):
    existing = tmp_path / "x.edge"
    existing.mkdir()
    code, _, err = run(capsys, "import", str(tmp_path / "missing.pt"), "--arch", "resnet18",
                       "--out", str(existing))
    _one_line_error(code, err, "not a bundle")


# --------------------------------------------------------------------------- eval results


def test_eval_prints_metrics_when_the_results_file_cannot_be_written(bundle, labeled_npz, capsys):
    blocked = bundle.with_name(bundle.name + ".results.json")
    blocked.mkdir()  # works as root too, where a read-only folder would not block writes
    try:
        code, out, err = run(capsys, "eval", str(bundle), "--data", str(labeled_npz), "--k", "3",
                             "--no-probe", "--json")
    finally:
        blocked.rmdir()
    assert code == 0, err
    assert json.loads(out)["knn_top1"]["3"] >= 0 and json.loads(out)["results_file"] is None
    assert "results not saved" in err and "--results PATH" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_of_a_bundle_in_a_read_only_folder(bundle, labeled_npz, capsys):
    folder = bundle.parent
    folder.chmod(0o555)
    try:
        code, out, err = run(capsys, "eval", str(bundle), "--data", str(labeled_npz), "--k", "3", "--no-probe")
    finally:
        folder.chmod(0o755)
    assert code == 0 and "kNN top-1" in out and "--results PATH" in err


def test_eval_results_flag_chooses_the_file_and_is_checked_first(bundle, labeled_npz, tmp_path, capsys):
    target = tmp_path / "mine.json"
    code, out, err = run(capsys, "eval", str(bundle), "--data", str(labeled_npz), "--k", "3",
                         "--no-probe", "--results", str(target), "--json")
    assert code == 0, err
    assert json.loads(out)["results_file"] == str(target)
    assert "eval" in next(iter(json.loads(target.read_text()).values()))
    code, _, err = run(capsys, "eval", str(bundle), "--data", str(labeled_npz), "--results", str(tmp_path))
    _one_line_error(code, err, "--results")


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("has_checkpoint", [True, False])
def test_ctrl_c_says_it_was_interrupted_and_how_to_resume(tmp_path, labeled_npz, capsys, monkeypatch, has_checkpoint):
    import edge_ssl.train.pretrain as pretrain_module

    out = tmp_path / "t.edge"

    def interrupted(*_args, **_kwargs):
        if has_checkpoint:
            ckpt = pretrain_module.checkpoint_dir(out) / "last.pt"
            ckpt.parent.mkdir()
            ckpt.write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "pretrain", interrupted)
    code, _, err = run(capsys, "pretrain", "--out", str(out), "--data", str(labeled_npz), *TINY)
    assert code == 130
    assert "interrupted" in err
    assert ("--resume" in err) == has_checkpoint


# --------------------------------------------------------------------------- flags


def test_sources_of_different_sizes_name_a_real_flag_that_works(tmp_path, labeled_npz, capsys):
    other = tmp_path / "big.npz"
    np.savez(other, x=np.zeros((8, 24, 24, 3), dtype=np.uint8))
    both = ["--data", str(labeled_npz), "--data", str(other)]
    code, _, err = run(capsys, "pretrain", "--out", str(tmp_path / "a.edge"), *both, *TINY)
    _one_line_error(code, err, "--image-size")
    code, _, err = run(capsys, "pretrain", "--out", str(tmp_path / "b.edge"), *both, "--image-size", "16", *TINY)
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["eval", "BUNDLE", "--limit", "0"], "--limit"),
        (["pretrain", "--out", "x.edge", "--limit", "0"], "--limit"),
        (["pretrain", "--out", "x.edge", "--epochs", "0"], "--epochs"),
        (["pretrain", "--out", "x.edge", "--warmup-epochs", "50"], "--warmup-epochs"),
        (["pretrain", "--out", "x.edge", "--method", "simclr", "--method-opt", "temperature=-1"],
         "--method-opt temperature"),
    ],
)
def test_messages_name_the_cli_flags(bundle, tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    args = [str(bundle) if a == "BUNDLE" else a for a in args]
    code, _, err = run(capsys, *args)
    _one_line_error(code, err, needle)
    assert "PretrainConfig" not in err and "Config." not in err
    assert not (tmp_path / "x.edge").exists()


def test_demo_help_does_not_claim_zero_epochs():
    result = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "default: 0" not in result.output and "--epochs" in result.output


def test_encoders_table_keeps_every_name_whole_at_80_columns():
    from edge_ssl.models import encoder_names

    result = CliRunner().invoke(app, ["encoders"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    words = set(result.output.replace("│", " ").split())
    assert set(encoder_names()) <= words


# --------------------------------------------------------------------------- inconsistent bundles


def test_manifest_arch_that_does_not_fit_the_weights(bundle, labeled_npz, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken.edge"
    shutil.copytree(bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["encoder"]["arch"] = "resnet34_cifar"  # same embed dim, more blocks
    (broken / "manifest.json").write_text(json.dumps(manifest))

    code, _, err = run(capsys, "inspect", str(broken))
    _one_line_error(code, err, "does not fit", "--no-verify")
    assert len(err) < 600
    code, out, err = run(capsys, "inspect", str(broken), "--no-verify", "--json")
    assert code == 0, err
    code, _, err = run(capsys, "eval", str(broken), "--data", str(labeled_npz), "--no-probe")
    _one_line_error(code, err, "do not fit", "96 missing")
    assert len(err) < 600, f"{len(err)} characters"
