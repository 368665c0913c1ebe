"""CLI for devices: profiles, deploy, rollback, predict, and bench/doctor on a device (--on)."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_ssl.commands.common import JsonOpt, app, emit_json

devices_app = typer.Typer(help="Jetson device profiles (data in devices/profiles.toml).",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(devices_app, name="devices")

ToOpt = Annotated[list[str] | None, typer.Option(
    "--to", help="Target: ssh://user@host[:port] (hosts from ~/.ssh/config work) or local. Repeatable.")]
HostsOpt = Annotated[Path | None, typer.Option("--hosts", help="File with one target per line.")]
SshConfigOpt = Annotated[str | None, typer.Option(
    "--ssh-config", envvar="EDGE_SSL_SSH_CONFIG", help="ssh -F file (default: ~/.ssh/config).")]
PythonOpt = Annotated[str, typer.Option(
    "--python", envvar="EDGE_SSL_DEVICE_PYTHON", help="Python on the device that runs the agent.")]
RootOpt = Annotated[str | None, typer.Option(
    "--remote-root", envvar="EDGE_SSL_REMOTE_ROOT", help="Folder on the device (default ~/.edge-ssl).")]
AcceptOpt = Annotated[bool, typer.Option(
    "--accept-new-host", help="Record an unknown host key on first use (a CHANGED key is always refused).")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds allowed per remote command.")]


#: The SSH options of every command that connects: name -> (typer annotation, default).
SSH_OPTIONS: dict[str, tuple[Any, Any]] = {
    "ssh_config": (SshConfigOpt, None), "python": (PythonOpt, "python3"),
    "remote_root": (RootOpt, None), "accept_new_host": (AcceptOpt, False),
}


def _settings(ssh_config: str | None, python: str, remote_root: str | None, accept_new_host: bool,
              timeout: float = 120.0) -> Any:
    from edge_ssl.devices.target import SSHSettings

    return SSHSettings(ssh_config=ssh_config, python=python, remote_root=remote_root,
                       accept_new_host=accept_new_host, command_timeout_s=timeout)


def with_ssh_options(*, timeout: bool = False) -> Any:
    """Give a command the SSH_OPTIONS (and --timeout) just before its --json, and pass them
    to it as one ``settings`` (an SSHSettings); the command declares only ``settings``."""
    options = {**SSH_OPTIONS, **({"timeout": (TimeoutOpt, 120.0)} if timeout else {})}
    keyword = inspect.Parameter.KEYWORD_ONLY

    def decorate(command: Any) -> Any:
        signature = inspect.signature(command, eval_str=True)
        own = [p.replace(kind=keyword) for p in signature.parameters.values() if p.name != "settings"]
        at = [p.name for p in own].index("as_json")
        added = [inspect.Parameter(name, keyword, default=default, annotation=annotation)
                 for name, (annotation, default) in options.items()]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            chosen = {name: kwargs.pop(name) for name in options}
            return command(**kwargs, settings=_settings(**chosen))

        run.__signature__ = signature.replace(parameters=own[:at] + added + own[at:])
        run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
        return run

    return decorate


def env_settings(accept_new_host: bool = False) -> Any:
    """SSH settings from the environment, for `bench --on` / `doctor --on` (owned elsewhere);
    ``accept_new_host`` is their --accept-new-host flag (EDGE_SSL_ACCEPT_NEW_HOST=1 also sets it)."""
    return _settings(os.environ.get("EDGE_SSL_SSH_CONFIG"), os.environ.get("EDGE_SSL_DEVICE_PYTHON", "python3"),
                     os.environ.get("EDGE_SSL_REMOTE_ROOT"),
                     accept_new_host or os.environ.get("EDGE_SSL_ACCEPT_NEW_HOST") == "1")


# ---------------------------------------------------------------- profiles
@devices_app.callback()
def devices(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the Jetson profiles; `edge-ssl devices show NAME` prints one."""
    if ctx.invoked_subcommand is not None:
        return
    from edge_ssl.devices.profiles import load_profiles

    profiles = load_profiles()
    if as_json:
        emit_json({key: p.to_dict() for key, p in sorted(profiles.items())})
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # 80 columns: units live in the title, every cell is a short number that never wraps.
    table = Table(title="Jetson profiles: GPU MHz, memory GB and GB/s, dense FP16 TFLOPS and "
                  "INT8 TOPS ('-': no cited source)", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for column in ("name", "SM", "CUDA/TC", "MHz", "DLA", "GB", "GB/s", "FP16", "INT8"):
        table.add_column(column, no_wrap=True, justify="left" if column == "name" else "right")
    for key, p in sorted(profiles.items()):
        table.add_row(key, p.compute_capability, f"{_s(p.cuda_cores)}/{_s(p.tensor_cores)}",
                      _whole(p.gpu_max_mhz), _s(p.dla_cores), _s(p.memory_gb), _whole(p.memory_bandwidth_gbs),
                      _s(p.peak_fp16_tflops_dense), _s(p.peak_int8_tops_dense))
    Console().print(table)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _whole(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _s(value: Any) -> str:
    return "-" if value is None else str(value)


@devices_app.command("show")
def show(name: Annotated[str, typer.Argument(help="Profile name, e.g. orin-nx-16gb.")], as_json: JsonOpt = False) -> None:
    """Print one profile with its JetPack versions and nvpmodel modes."""
    from edge_ssl.devices.profiles import get_profile

    data = get_profile(name).to_dict()
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        if isinstance(value, dict):
            typer.echo(f"{key}:")
            for sub, item in value.items():
                typer.echo(f"  {sub}: {item}")
        else:
            typer.echo(f"{key}: {_s(value)}")


# ---------------------------------------------------------------- deploy / rollback
def _print_fleet(title: str, outcomes: list[Any], columns: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("target", "status", *columns):
        table.add_column(column)
    for row in outcomes:
        cells = [str(fn(row.result)) if row.ok else "" for fn in columns.values()]
        table.add_row(row.target, "ok" if row.ok else f"FAILED: {row.error}", *cells)
    Console().print(table)


def _finish(outcomes: list[Any], title: str, columns: dict[str, Any], as_json: bool,
            notes: Any = None) -> None:
    """Print the fleet table (or JSON); ``notes(result)`` adds lines under it per host."""
    if as_json:
        emit_json([o.to_dict() for o in outcomes])
    else:
        _print_fleet(title, outcomes, columns)
        for row in outcomes:
            for note in notes(row.result) if notes and row.ok else []:
                typer.echo(f"{row.target}: {note}")
            for warning in (row.result or {}).get("warnings", []):
                typer.echo(f"warning ({row.target}): {warning}", err=True)
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


@app.command()
@with_ssh_options(timeout=True)
def deploy(
    bundle: Annotated[Path, typer.Argument(help="A NAME.edge bundle (with model.onnx).")],
    to: ToOpt = None,
    hosts: HostsOpt = None,
    profile: Annotated[str | None, typer.Option("--for", "--profile", help="Device profile (default: detected on the device); --profile is the older spelling.")] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name on the device (default: the bundle's).")] = None,
    build_engine: Annotated[bool, typer.Option(help="Build the TensorRT engine on the device with trtexec.")] = False,
    engine_precision: Annotated[str | None, typer.Option(help="fp32, fp16 or int8 (default from the bundle).")] = None,
    keep: Annotated[int, typer.Option(help="Versions kept on the device for rollback.")] = 3,
    ship_weights: Annotated[bool, typer.Option(help="Also send model.pt (only needed to adapt on the device).")] = False,
    as_json: JsonOpt = False,
    settings: Any = None,
) -> None:
    """Check, upload (resumable), verify, optionally build, then switch `current` atomically."""
    from edge_ssl.devices.deploy import DeployOptions
    from edge_ssl.devices.deploy import deploy as run_deploy
    from edge_ssl.devices.fleet import collect_targets, run_on_fleet

    specs = collect_targets(to, hosts)
    options = DeployOptions(name=name, profile=profile, build_engine=build_engine,
                            engine_precision=engine_precision, keep=keep, ship_weights=ship_weights)
    outcomes = run_on_fleet(specs, settings, lambda target: run_deploy(bundle, target, options).to_dict())
    _finish(outcomes, f"deploy {bundle.name}", {
        "version": lambda r: r["version"], "previous": lambda r: r["previous"] or "-",
        "uploaded": lambda r: f"{r['uploaded_bytes'] / 2**20:.1f} MiB",
        "resumed": lambda r: ",".join(r["resumed_files"]) or "-", "engine": lambda r: r["engine"] or "-",
    }, as_json, notes=_repair_note)


def _repair_note(result: dict[str, Any]) -> list[str]:
    if not result.get("repaired_files"):
        return []
    return [f"repaired version {result['version']}: {', '.join(result['repaired_files'])} "
            "had been damaged on the device; re-sent, verified, then switched."]


@app.command()
@with_ssh_options()
def rollback(
    name: Annotated[str, typer.Argument(help="Deployment name (the bundle's name unless --name was given).")],
    to: ToOpt = None,
    hosts: HostsOpt = None,
    version: Annotated[str | None, typer.Option(help="Version to switch to (default: the previous one).")] = None,
    as_json: JsonOpt = False,
    settings: Any = None,
) -> None:
    """Switch `current` back to the previous kept version on each device."""
    from edge_ssl.devices.deploy import rollback as run_rollback
    from edge_ssl.devices.fleet import collect_targets, run_on_fleet

    outcomes = run_on_fleet(collect_targets(to, hosts), settings,
                            lambda target: run_rollback(target, name, version))
    _finish(outcomes, f"rollback {name}", {"current": lambda r: r["current"],
                                           "was": lambda r: r["previous"] or "-",
                                           "verified": lambda r: f"{r.get('verified_files', '?')} files"},
            as_json)


# ---------------------------------------------------------------- remote bench / doctor
def bench_on_devices(bundle: Path, on: list[str], *, backend: str = "auto", batch_sizes: tuple[int, ...] = (1,),
                     duration: float = 10.0, warmup: float = 2.0, iterations: int | None = None,
                     threads: int | None = None, record: bool = True, as_json: bool = False,
                     settings: Any = None, accept_new_host: bool = False) -> None:
    """`edge-ssl bench B.edge --on TARGET`: the agent measures on each device; results recorded locally."""
    from edge_ssl.devices.fleet import run_on_fleet
    from edge_ssl.devices.remote import remote_bench

    remote_backend = "trtexec" if backend in ("tensorrt", "trtexec") else "onnxruntime"
    outcomes = run_on_fleet(list(dict.fromkeys(on)), settings or env_settings(accept_new_host), lambda target: remote_bench(
        bundle, target, backend=remote_backend, batch_sizes=batch_sizes, duration_s=duration,
        warmup_s=warmup, iterations=iterations, threads=threads, record=record))
    first = str(batch_sizes[0])
    _finish(outcomes, f"bench {bundle.name} on devices (measured)", {
        "backend": lambda r: r["backend"],
        f"p50 ms (b{first})": lambda r: _ms(r["batches"][first].get("p50")),
        f"p90 ms (b{first})": lambda r: _ms(r["batches"][first].get("p90")),
        "power W": lambda r: f"{r['power']['avg_power_w']:.2f}" if r.get("power") else "-",
        "nvpmodel": lambda r: (r["environment"].get("nvpmodel") or {}).get("name", "-"),
    }, as_json)


@app.command("device-bench")
@with_ssh_options()
def device_bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle to measure on the device.")],
    on: Annotated[list[str], typer.Option("--on", help="Target(s): ssh://user@host[:port] or local.")],
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt (trtexec on the device).")] = "onnxruntime",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    duration: Annotated[float, typer.Option(help="Seconds measured per batch size.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Warm-up seconds per batch size.")] = 2.0,
    iterations: Annotated[int | None, typer.Option(help="Exactly N timed runs instead of --duration.")] = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads on the device.")] = None,
    as_json: JsonOpt = False,
    settings: Any = None,
) -> None:
    """Same as `edge-ssl bench B --on TARGET`, with every SSH option spelled out."""
    from edge_ssl.runtime.batch_sizes import parse_batch_sizes

    bench_on_devices(bundle, on, backend=backend, batch_sizes=parse_batch_sizes(batch, "--batch"), duration=duration, warmup=warmup,
                     iterations=iterations, threads=threads, as_json=as_json,
                     settings=settings)


def doctor_on_device(on: str, as_json: bool = False, settings: Any = None, name: str | None = None,
                     accept_new_host: bool = False) -> None:
    """`edge-ssl doctor --on TARGET`: what the device offers, and whether what is deployed
    there is intact; exits 1 when a deployment's `current` fails verification."""
    from edge_ssl.devices.remote import remote_doctor
    from edge_ssl.devices.target import parse_target

    with parse_target(on, settings or env_settings(accept_new_host)) as target:
        report = remote_doctor(target, name)
    damaged = any(e["version"] is not None and not e["ok"] for e in report["deployments"].values())
    if as_json:
        emit_json(report)
    else:
        _print_doctor(report)
    if damaged:
        raise typer.Exit(1)


def clocks_text(pinned: bool | None, jetson: bool) -> str:
    """The agent's clocks_pinned (True/False/None) in words."""
    if pinned is True:
        return "yes (GPU min clock = max clock)"
    if pinned is False:
        return "no (run `sudo jetson_clocks` before measuring)"
    return "unknown (GPU clock limits not readable" + (")" if jetson else ": not a Jetson)")


def deployment_text(entry: dict[str, Any]) -> str:
    """One deployment's `current` check in words (doctor --on)."""
    if entry["version"] is None:
        return "nothing current (no version switched in)"
    if entry["ok"]:
        return f"{entry['version']} ok ({entry['files']} files match sha256)"
    bad = ", ".join(f"{b['file']} ({b['problem']})" for b in entry["bad"])
    return f"{entry['version']} DAMAGED: {bad}"


def _print_doctor(report: dict[str, Any]) -> None:
    agent = report["agent"]
    rows = {
        "target": report["target"], "board": report["model"] or "not a Jetson",
        "profile": report["profile"] or "-", "L4T / JetPack": f"{report['l4t'] or '-'} / {report['jetpack'] or '-'}",
        "python": f"{agent['python']} ({agent['python_executable']})",
        "numpy": agent["numpy"].get("version") or agent["numpy"].get("missing"),
        "onnxruntime": (f"{agent['onnxruntime']['version']} {agent['onnxruntime'].get('providers')}"
                        if "version" in agent["onnxruntime"] else agent["onnxruntime"]["missing"]),
        "tensorrt": agent["tensorrt"].get("version") or agent["tensorrt"].get("missing"),
        "trtexec": agent["trtexec"] or "-", "nvpmodel": report["nvpmodel"] or "-",
        "clocks pinned": clocks_text(agent["clocks_pinned"], bool(agent.get("nv_tegra_release"))),
        "free disk": f"{agent['disk']['free'] / 2**30:.1f} GiB under {agent['disk']['path']}",
        "memory available": f"{agent['memory'].get('MemAvailable', 0) / 2**30:.1f} GiB",
    }
    for key, value in rows.items():
        typer.echo(f"{key:>17}: {value}")
    deployments = report["deployments"]
    typer.echo(f"{'deployments':>17}: " + (f"{len(deployments)}; each one's current version checked"
                                          if deployments else "none"))
    for name, entry in sorted(deployments.items()):
        typer.echo(f"{name:>17}: {deployment_text(entry)}")
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)


@app.command("device-doctor")
@with_ssh_options()
def device_doctor(
    on: Annotated[str, typer.Option("--on", help="Target: ssh://user@host[:port] or local.")],
    name: Annotated[str | None, typer.Option(help="Verify only this deployment (default: all).")] = None,
    as_json: JsonOpt = False,
    settings: Any = None,
) -> None:
    """Same as `edge-ssl doctor --on TARGET`, with every SSH option spelled out."""
    doctor_on_device(on, as_json, settings, name)


# ---------------------------------------------------------------- predict
@app.command()
def predict(
    paths: Annotated[list[Path] | None, typer.Argument(
        metavar="BUNDLE|RESULTS...", help="A bundle with model.onnx (or a bare .onnx file); with "
        "--calibrate: measured bundles, their .results.json or measurement JSONs.")] = None,
    for_profile: Annotated[str | None, typer.Option(
        "--for", help="Device profile, e.g. orin-nx-16gb (see `edge-ssl devices`).")] = None,
    precision: Annotated[str | None, typer.Option(
        help="int8 or fp16 (TensorRT); with --calibrate: the engines' (default: each bundle's).")] = None,
    power_mode: Annotated[int | None, typer.Option(help="nvpmodel mode id (default: the fastest).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Fold the TensorRT measurements in RESULTS (`bench --on --backend "
        "tensorrt`) into your local calibration, used by later predictions for those boards.")] = False,
    device: Annotated[str | None, typer.Option(hidden=True)] = None,
    as_json: JsonOpt = False,
) -> None:
    """PREDICTED TensorRT latency from a per-layer roofline, fitted on published results.

    Never a measurement: prints the estimate, an interval from the cross-validated error of its calibration group ("uncalibrated" where no published result covers it) and the share of the time spent in per-kernel overhead. For a bundle the prediction is also recorded beside it (NAME.edge.results.json, under 'predict').
    """
    from edge_ssl.errors import ConfigError

    if device is not None:
        raise ConfigError(f"`predict --device {device}` is now `predict --for {device}`: --for names a "
                          "device profile, --device a torch device (one name per meaning across commands).")
    if calibrate:
        if not paths:
            raise ConfigError("--calibrate needs RESULTS: bundles measured with `edge-ssl bench B.edge "
                              "--on ssh://... --backend tensorrt`, their .results.json or measurement JSONs.")
        _predict_calibrate(paths, precision, as_json)
        return
    if not paths or len(paths) != 1 or for_profile is None:
        raise ConfigError(f"predict takes one bundle (or .onnx) and --for PROFILE; got {len(paths or [])} "
                          "path(s). E.g. `edge-ssl predict B.edge --for orin-nano-8gb --precision int8`.")
    _predict_one(paths[0], for_profile, precision or "fp16", power_mode, batch, as_json)


def _predict_one(bundle: Path, profile: str, precision: str, power_mode: int | None, batch: int,
                 as_json: bool) -> None:
    from edge_ssl.devices.predict import predict_bundle, record_prediction
    from edge_ssl.errors import BundleError

    report = predict_bundle(bundle, profile, precision=precision, power_mode=power_mode, batch=batch)
    recorded, note = None, None
    if bundle.suffix != ".onnx":
        try:
            recorded = str(record_prediction(bundle, report))
        except BundleError as exc:
            note = f"note: the prediction was not recorded ({exc})"
    if as_json:
        emit_json({**report.to_dict(), "recorded_in": recorded})
    else:
        typer.echo(report.summary())
        if recorded:
            typer.echo(f"recorded in {recorded}")
    if note:
        typer.echo(note, err=True)


def _predict_calibrate(paths: list[Path], precision: str | None, as_json: bool) -> None:
    from edge_ssl.devices.predict import calibrate

    summary = calibrate(paths, precision)
    if as_json:
        emit_json(summary)
        return
    typer.echo(f"added {summary['added']} measurement(s) to {summary['written']}")
    for board, entry in sorted(summary["boards"].items()):
        typer.echo(f"  {board}: {entry['measurements']} measurement(s); predictions scaled "
                   f"x{entry['factor']:.3f}")
    typer.echo("later `edge-ssl predict --for` on these boards uses them (and says so).")
