"""`edge-ssl adapt-tune`: choose a bundle's adaptation BN settings on labeled clean images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_ssl.commands.common import (
    DataOpt,
    JsonOpt,
    app,
    data_source,
    emit_json,
    parse_key_values,
    stderr_console,
)


@app.command("adapt-tune")
def adapt_tune(
    bundle: Annotated[Path, typer.Argument(help="The bundle to tune (float, or quantized with its float parent on disk).")],
    out: Annotated[Path, typer.Option(help="Tuned bundle to write: the same files plus adapt_settings.json.")],
    data: DataOpt = None,
    max_clean_drop: Annotated[float, typer.Option(help="Clean kNN points AdaBN alone may cost (mean over "
                                                  "the corruptions).")] = 0.5,
    corruptions: Annotated[str | None, typer.Option(help="Comma-separated corruptions to tune on (default: "
                                                    "speckle_noise,gaussian_blur,saturate).")] = None,
    probe_images: Annotated[int, typer.Option(help="Labeled images held out of the kNN bank (half adapted "
                                              "on, half scored).")] = 2000,
    replay_images: Annotated[int, typer.Option(help="Clean images (not the probe) shipped as adapt_replay.npz "
                                               "for replay during adaptation; 0 for none.")] = 1000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    opt: Annotated[list[str] | None, typer.Option(help="Any TuneConfig KEY=VALUE, e.g. priors=[0.5,0.7] (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N images.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pick bn_depth and bn_prior for `edge-ssl adapt` from labeled clean images: AdaBN alone on
    synthetic shifts, the most recovery within the clean budget; ship clean replay images with
    the replay step settings; `adapt` then uses them."""
    from edge_ssl.adapt.tune import TuneConfig, tune_bn_settings, write_tuned
    from edge_ssl.bundle import Bundle
    from edge_ssl.data.sources import load_images
    from edge_ssl.lineage import require_float_weights
    from edge_ssl.models import load_encoder
    from edge_ssl.outputs import check_bundle_out

    values = {"max_clean_drop": max_clean_drop, "probe_images": probe_images, "device": device,
              "replay_images": replay_images,
              **({"corruptions": tuple(c.strip() for c in corruptions.split(",") if c.strip())}
                 if corruptions else {}),
              **parse_key_values(opt, "--opt")}
    config = TuneConfig.from_dict(values)
    source = Bundle.open(bundle, verify=True)
    weights = require_float_weights(source, "adapt-tune")
    check_bundle_out(out, overwrite=overwrite)  # before minutes of work
    dataset = load_images(data_source(data), limit=limit)
    console = stderr_console()
    console.print(f"data: {dataset.source} ({len(dataset)} images)")
    started = time.perf_counter()
    result = tune_bn_settings(load_encoder(weights), dataset, config, progress=console.print)  # stderr
    tuned = write_tuned(source, result, out, overwrite=overwrite)
    if as_json:
        emit_json({"bundle": str(tuned.path), "seconds": round(time.perf_counter() - started, 1),
                   **result.to_dict()})
        return
    _print_choice(console, result, config)
    console.print(f"wrote {tuned.path}; `edge-ssl adapt` uses these settings unless --opt sets them.")


def _print_choice(console: Any, result: Any, config: Any) -> None:
    chosen = result.choice
    if result.bn_stats:
        console.print(f"chosen: bn_depth {result.bn_depth:g}, bn_prior {result.bn_prior:g} "
                      f"(recovery {chosen['recovery_significant']:.2f} over {', '.join(result.significant)}; "
                      f"clean drop {chosen['clean_drop_pts']:.2f} points)")
    else:
        console.print(f"[yellow]chosen: keep the deployed BN statistics (bn_stats false): every "
                      f"re-estimation lost accuracy on {', '.join(result.significant)} or cost more than "
                      f"{config.max_clean_drop:g} clean points.[/yellow]")
    if result.replay is not None:
        console.print(f"replay: {len(result.replay)} clean images in adapt_replay.npz, with "
                      f"align_weight {result.settings()['align_weight']:g} and replay_weight "
                      f"{result.settings()['replay_weight']:g}")
