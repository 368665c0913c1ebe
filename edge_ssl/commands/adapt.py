"""`edge-ssl adapt` and `adapt-tune`: choose adaptation settings, adapt within a memory budget."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_ssl.commands.common import (
    DataOpt,
    DeviceOpt,
    JsonOpt,
    LimitOpt,
    OverwriteOpt,
    app,
    comma_list,
    data_source,
    emit_json,
    parse_key_values,
    stderr_console,
)

OnOpt = Annotated[str | None, typer.Option(help="Device (local or ssh://user@host) to adapt on and deploy to; its "
                                           "profile sets the default budget. Staged, verified, rollback kept.")]
TrainOnOpt = Annotated[str, typer.Option(help="With --on: 'device' trains on the device on its own images "
                                          "(--data is a path there; needs edge-ssl + torch on it), 'host' "
                                          "trains here on local images and deploys the result.")]
DevicePythonOpt = Annotated[str | None, typer.Option(
        help="--train-on device: the device's Python with torch and edge-ssl (default: the "
        "agent's, EDGE_SSL_DEVICE_PYTHON or python3).")]
BudgetOpt = Annotated[float | None, typer.Option(help="Memory for one step in MiB (default: 25% of the "
                                                    "profile's memory, else 50% of free memory).")]
LrOpt = Annotated[float | None, typer.Option(help="Learning rate (default 1e-3 with AdamW; lower it if the "
                                             "guard stops the run).")]
ReplayDataOpt = Annotated[Path | None, typer.Option(
        help="Clean images for replay_weight (default: the bundle's adapt_replay.npz from adapt-tune). "
        "Host runs only.")]
DeviceTimeoutOpt = Annotated[float, typer.Option(help="--train-on device: seconds the run may take.")]
AdaptOpt = Annotated[list[str] | None, typer.Option(help="Any AdaptConfig KEY=VALUE, e.g. bn_prior=0.2 (repeatable).")]
ExportOpt = Annotated[str, typer.Option(help="Re-export model.onnx: auto (when the input had one), always, never.")]


@app.command()
def adapt(
    bundle: Annotated[Path, typer.Argument(help="The deployed bundle (float, or quantized with its float parent on disk).")],
    out: Annotated[Path, typer.Option(help="Adapted bundle to write, e.g. adapted.edge.")],
    data: DataOpt = None,
    on: OnOpt = None,
    train_on: TrainOnOpt = "device",
    device_python: DevicePythonOpt = None,
    device_timeout: DeviceTimeoutOpt = 6 * 3600.0,
    profile: Annotated[str | None, typer.Option(help="Device profile for the default budget (e.g. orin-nano-8gb).")] = None,
    budget_mb: BudgetOpt = None,
    steps: Annotated[int, typer.Option(help="Gradient steps (20-100 is typical on device).")] = 30,
    trainable: Annotated[str, typer.Option(help="auto, bn-stats, bias, norm, lora, last-stage or full.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Largest batch; shrunk to fit the budget.")] = 32,
    lr: LrOpt = None,
    method: Annotated[str, typer.Option(help="SSL loss: simsiam or byol.")] = "simsiam",
    device: DeviceOpt = "auto",
    opt: AdaptOpt = None,
    export: ExportOpt = "auto",
    limit: LimitOpt = None,
    replay_data: ReplayDataOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.ckpt/ after a stop or power cut.")] = False,
    overwrite: OverwriteOpt = False,
    accept_new_host: Annotated[bool, typer.Option("--accept-new-host", help="With --on: record an unknown host key on first use (a CHANGED key is always refused).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Adapt an encoder on unlabeled local images: AdaBN, then guarded SSL + distillation steps."""
    from edge_ssl.adapt.api import AdaptConfig
    from edge_ssl.adapt.api import adapt as run_adapt
    from edge_ssl.data.sources import load_images

    settings = {"trainable": trainable, "steps": steps, "batch_size": batch_size, "budget_mb": budget_mb,
                "method": method, "device": device, **({"lr": lr} if lr is not None else {}),
                **parse_key_values(opt, "--opt")}
    config = AdaptConfig.from_dict(settings)  # checked here, before anything reaches a device
    if train_on not in ("device", "host"):
        raise typer.BadParameter(f"--train-on must be device or host; got {train_on!r}.")
    target = _open_target(on, accept_new_host) if on else None
    if target is not None and train_on == "device":
        _check_device_run(data, replay_data)
        _adapt_on_device(bundle, target, out, list(data), profile, device_python, device_timeout,
                         _pass_through(settings, opt, limit), resume=resume, overwrite=overwrite,
                         as_json=as_json)
        return
    config = _with_bundle_settings(bundle, settings, config)
    dataset = load_images(data_source(data), limit=limit)
    replay = load_images(str(replay_data)).images if replay_data is not None else None
    console = stderr_console()
    _note_missing_settings(console, bundle, as_json)
    console.print(f"data: {dataset.source} ({len(dataset)} images, {dataset.image_size[0]}x{dataset.image_size[1]})")
    result = run_adapt(bundle, dataset, out, config, resume=resume, overwrite=overwrite,
                       profile_memory_gb=_profile_memory_gb(profile, target), power=_power(),
                       export="always" if target and export == "auto" else export,
                       progress=_printer(console, as_json), replay=replay, profile=profile)
    report = result.to_dict()
    if target is not None:
        report["deploy"] = _deploy(result.bundle.path, target, bundle, profile)
    if as_json:
        emit_json(report)
        return
    _summary(console, result, report.get("deploy"))


def _power() -> Any:
    """Energy per step, measured where tegrastats exists (a Jetson), else None with the reason."""
    from edge_ssl.devices.remote_adapt import StepPowerMeter

    return StepPowerMeter()


def _note_missing_settings(console: Any, bundle: Path, as_json: bool) -> None:
    if not _has_settings(bundle) and not as_json:
        console.print("note: this bundle has no adapt_settings.json (imported, or compressed without "
                      "labels): package defaults, and the best of unadapted / AdaBN alone / adapted is "
                      "kept. `edge-ssl adapt-tune` would choose settings for it.")


def _check_device_run(data: Any, replay_data: Path | None) -> None:
    if not data:
        raise typer.BadParameter("--train-on device needs --data: the images' path on the device.")
    if replay_data is not None:
        raise typer.BadParameter("--replay-data is for host runs; on the device the bundle's own replay "
                                 "images are used (edge-ssl adapt-tune ships them in adapt_replay.npz).")


def _with_bundle_settings(bundle: Path, settings: dict[str, Any], config: Any) -> Any:
    """``config`` with the BN settings ``edge-ssl adapt-tune`` recorded in the bundle (the
    explicit settings win); a bundle that cannot be opened keeps ``config`` and fails later
    with adaptation's own message."""
    from edge_ssl.adapt.tune import adapt_config_for
    from edge_ssl.bundle import Bundle
    from edge_ssl.errors import BundleError

    try:
        opened = Bundle.open(bundle, verify=False)
    except (BundleError, OSError):
        return config
    return adapt_config_for(opened, settings)


def _has_settings(bundle: Path) -> bool:
    from edge_ssl.adapt.tune import settings_file
    from edge_ssl.bundle import Bundle
    from edge_ssl.errors import BundleError

    try:
        return settings_file(Bundle.open(bundle, verify=False)) is not None
    except (BundleError, OSError):
        return True  # adaptation's own check names the problem


def _pass_through(settings: dict[str, Any], opt: list[str] | None, limit: int | None) -> list[str]:
    """The adapt options for the device's command line (only what was set)."""
    args = ["--steps", str(settings["steps"]), "--trainable", settings["trainable"],
            "--batch-size", str(settings["batch_size"]), "--method", settings["method"],
            "--device", settings["device"]]
    if settings.get("budget_mb") is not None:
        args += ["--budget-mb", repr(settings["budget_mb"])]
    if "lr" in settings and not any(o.startswith("lr=") for o in opt or []):
        args += ["--lr", repr(settings["lr"])]
    for item in opt or []:
        args += ["--opt", item]
    if limit is not None:
        args += ["--limit", str(limit)]
    return args


def _adapt_on_device(bundle: Path, target: Any, out: Path, data: list[str], profile: str | None,
                     python: str | None, timeout: float, cli_args: list[str], *, resume: bool,
                     overwrite: bool, as_json: bool) -> None:
    from edge_ssl.devices.remote_adapt import DeviceAdaptJob, adapt_on_device

    console = stderr_console()
    job = DeviceAdaptJob(data=tuple(data), cli_args=tuple(cli_args), python=python, profile=profile,
                         resume=resume, timeout_s=timeout)
    show = (lambda line: None) if as_json else (lambda line: console.print(f"[{target.label}] {line}",
                                                                             markup=False, highlight=False))
    with target:
        report = adapt_on_device(bundle, target, out, job, overwrite=overwrite, progress=show)
    if as_json:
        emit_json(report)
        return
    plan, deployed = report["plan"], report["deploy"]
    console.print(
        f"adapted on {deployed['target']} (torch {report['trained_on']['torch']}): trainable "
        f"{plan['trainable']}, batch {plan['batch_size']}, {report['steps_done']} steps, step memory "
        f"{report['peak_step_mb']:.1f} MiB; copy at {out}"
    )
    if report.get("stopped"):
        console.print(f"stopped early: {report['stopped']}")
    console.print(f"deployed version {deployed['version']} (previous {deployed['previous']}, kept for rollback)")


def _printer(console: Any, quiet: bool) -> Any:
    def show(event: Any) -> None:
        if quiet:
            return
        if event.phase == "step" and not event.message:
            if event.step % 5 == 0 or event.step == event.steps:
                console.print(f"step {event.step}/{event.steps}  loss {event.loss:.4f}  batch {event.batch}")
        elif event.message:
            console.print(f"[{event.phase}] {event.message}")
    return show


def _summary(console: Any, result: Any, deploy: Any) -> None:
    plan = result.plan
    console.print(
        f"wrote {result.bundle.path}: trainable {plan['trainable']}"
        f"{' + checkpointing' if plan['checkpointing'] else ''}, batch {plan['batch_size']}, "
        f"{result.steps_done} steps, step memory {result.peak_step_mb:.1f} MiB "
        f"(budget {plan['budget_mb']:.0f} MiB: {plan['budget_source']})"
    )
    console.print(
        f"effective rank {result.health_before.effective_rank:.1f} -> {result.health_after.effective_rank:.1f}, "
        f"agreement with the deployed model {result.agreement_after:.3f}"
    )
    if result.stopped:
        console.print(f"stopped early: {result.stopped}")
    if result.selection:
        console.print(f"kept: {result.selection['kept']} (of unadapted / AdaBN alone / adapted, by "
                      f"{result.selection['criterion']} on the held-back images)")
    energy = (result.metrics.get("device_cost") or {}).get("energy") or {}
    if energy.get("energy_per_step_j") is not None:
        console.print(f"energy per step {energy['energy_per_step_j']:.3f} J at {energy['avg_power_w']:.2f} W "
                      f"({energy['rail']}, measured)")
    if deploy:
        console.print(f"deployed version {deploy['version']} (previous {deploy['previous']}, kept for rollback)")


def _open_target(spec: str, accept_new_host: bool = False) -> Any:
    from edge_ssl.commands.devices import env_settings
    from edge_ssl.devices.target import parse_target

    return parse_target(spec, env_settings(accept_new_host))


def _profile_memory_gb(profile: str | None, target: Any) -> float | None:
    """Memory of the named profile, else of the target's detected profile, else its MemTotal."""
    if profile:
        from edge_ssl.devices.profiles import get_profile

        return get_profile(profile).memory_gb
    if target is None:
        return None
    from edge_ssl.devices.deploy import resolve_profile

    info = target.agent("info", "--root", target.root)
    found, _ = resolve_profile(None, info)
    if found is not None and found.memory_gb:
        return found.memory_gb
    total = (info.get("memory") or {}).get("MemTotal")
    return total / 2**30 if total else None


def _deploy(adapted: Path, target: Any, parent: Path, profile: str | None) -> dict[str, Any]:
    """Deploy under the parent's deployment name: `current` switches, the parent stays for rollback."""
    from edge_ssl.adapt.inputs import deployment_name
    from edge_ssl.bundle import Bundle
    from edge_ssl.devices.deploy import DeployOptions, deploy

    name = deployment_name(Bundle.open(parent, verify=False))
    return deploy(adapted, target, DeployOptions(name=name, profile=profile)).to_dict()


# ---------------------------------------------------------------- adapt-tune
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
    device: DeviceOpt = "auto",
    opt: Annotated[list[str] | None, typer.Option(help="Any TuneConfig KEY=VALUE, e.g. priors=[0.5,0.7] (repeatable).")] = None,
    limit: LimitOpt = None,
    overwrite: OverwriteOpt = False,
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

    names = comma_list(corruptions)
    values = {"max_clean_drop": max_clean_drop, "probe_images": probe_images, "device": device,
              "replay_images": replay_images, **({"corruptions": tuple(names)} if names else {}),
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
