"""The on-device agent: stdlib (+ numpy/onnxruntime or TensorRT for bench), JSON on stdout."""

# Runs ON the device with the Python JetPack ships (3.6 on JetPack 4, 3.8 on JetPack 5,
# 3.10 on JetPack 6): keep the syntax Python 3.8-compatible (no match, no X | Y types, no
# str.removesuffix) and import nothing from edge_ssl. It is uploaded as a small kit (this
# file with runtime/stats.py and runtime/batch_sizes.py beside it, devices/target.agent_kit)
# and run as `python3 agent.py COMMAND ...`.
# Every command prints exactly one JSON object; failures print {"ok": false, "error": ...}
# and exit 1, so the host can always parse the answer.

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

AGENT_VERSION = 1
DEPLOY_NOTE = "deploy.json"  # written by deploy beside the manifest: what was not shipped
CHUNK = 1 << 20
TRTEXEC_CANDIDATES = ("/usr/src/tensorrt/bin/trtexec", "/usr/local/bin/trtexec")


class AgentError(Exception):
    """A failure the agent reports as JSON (message says what failed and how to fix it)."""


# ---------------------------------------------------------------- files
def sha256_file(path, limit=None):
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while True:
            size = CHUNK if remaining is None else min(CHUNK, remaining)
            if size == 0:
                break
            chunk = f.read(size)
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def stat_tree(root):
    """{relative path: {bytes, sha256}} for every regular file under root."""
    files = {}
    if not os.path.isdir(root):
        return files
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            rel = os.path.relpath(path, root)
            files[rel] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    return files


def _omitted(folder):
    """Files deploy chose not to ship: only float weights, which the device cannot use."""
    deploy_note = os.path.join(folder, DEPLOY_NOTE)
    if not os.path.isfile(deploy_note):
        return set()
    try:
        with open(deploy_note) as f:
            return set(json.load(f).get("omitted", [])) & {"model.pt"}
    except (OSError, ValueError, AttributeError):
        return set()  # an unreadable note omits nothing: every file is checked


def _file_problem(path, record):
    if not os.path.isfile(path):
        return "missing"
    if os.path.getsize(path) != record.get("bytes"):
        return "size {} != {}".format(os.path.getsize(path), record.get("bytes"))
    if sha256_file(path) != record.get("sha256"):
        return "sha256 mismatch"
    return None


def verify_bundle(folder, overlay=None):
    """Check every file the bundle's manifest lists (size + sha256).

    With ``overlay`` (a folder holding replacement files, as a repair stages them), a
    file present there is checked instead of the one in ``folder``.
    """

    def pick(name):
        if overlay and os.path.isfile(os.path.join(overlay, name)):
            return os.path.join(overlay, name)
        return os.path.join(folder, name)

    manifest_path = pick("manifest.json")
    if not os.path.isfile(manifest_path):
        raise AgentError(f"{folder} has no manifest.json; it is not a deployed bundle.")
    with open(manifest_path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        files = json.loads(raw.decode("utf-8"))["files"]
        records = sorted(files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        bad = [{"file": "manifest.json", "problem": "unreadable"}]
        return {"ok": False, "bad": bad, "manifest_sha256": digest, "files": 0, "omitted": []}
    omitted = _omitted(folder) if overlay is None or not os.path.isfile(
        os.path.join(overlay, DEPLOY_NOTE)) else _omitted(overlay)
    bad = []
    for name, record in records:
        problem = None if name in omitted else _file_problem(pick(name), record)
        if problem:
            bad.append({"file": name, "problem": problem})
    return {"ok": not bad, "bad": bad, "manifest_sha256": digest,
            "files": len(files) - len(omitted), "omitted": sorted(omitted)}


def describe_bad(bad):
    """'model.onnx (sha256 mismatch), blob.bin (missing)' from a verify report's ``bad``."""
    return ", ".join("{} ({})".format(b["file"], b["problem"]) for b in bad)


def check_version(app, version, overlay=None):
    """verify_bundle's report for versions/<version>; damage is reported, never raised."""
    folder = os.path.join(app, "versions", version)
    if not os.path.isdir(folder):
        bad = [{"file": "versions/" + version, "problem": "missing"}]
        return {"ok": False, "bad": bad, "manifest_sha256": None, "files": 0, "omitted": []}
    manifest = os.path.join(overlay or folder, "manifest.json")
    if not os.path.isfile(manifest) and not os.path.isfile(os.path.join(folder, "manifest.json")):
        bad = [{"file": "manifest.json", "problem": "missing"}]
        return {"ok": False, "bad": bad, "manifest_sha256": None, "files": 0, "omitted": []}
    return verify_bundle(folder, overlay)


# ---------------------------------------------------------------- deployments
def _app_dir(root, name):
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
        raise AgentError(f"deployment name {name!r} must be letters, digits, '.', '_' or '-'.")
    return os.path.join(root, "deployments", name)


def _read_history(app):
    path = os.path.join(app, "history.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def _write_atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _switch_link(app, version):
    """Point app/current at versions/<version>: a new link renamed over the old one."""
    tmp = os.path.join(app, f"current.new-{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join("versions", version), tmp)
    os.replace(tmp, os.path.join(app, "current"))


def current_version(app):
    link = os.path.join(app, "current")
    if not os.path.islink(link):
        return None
    return os.path.basename(os.readlink(link))


def activate(root, name, version, keep, expect_manifest=None):
    """Promote staging/<version> (verified) to versions/<version> and switch current to it.

    A deployed version that fails verification is repaired from the files deploy staged
    for it (each replaced atomically once all of them verify) before the switch.
    """
    app = _app_dir(root, name)
    staged = os.path.join(app, "staging", version)
    final = os.path.join(app, "versions", version)
    repaired = []
    if not os.path.isdir(final):
        if not os.path.isdir(staged):
            raise AgentError(f"version {version} is neither staged nor deployed under {app}.")
        report = verify_bundle(staged)
        if not report["ok"]:
            raise AgentError("staged bundle failed sha256 verification: {}; run deploy again.".format(
                describe_bad(report["bad"])))
        if expect_manifest and report["manifest_sha256"] != expect_manifest:
            raise AgentError("the staged manifest is not the one being deployed; run deploy again.")
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(staged, final)
    else:
        report = check_version(app, version)
        if not report["ok"] or (expect_manifest and report["manifest_sha256"] != expect_manifest):
            if not os.path.isdir(staged):
                raise AgentError(
                    "deployed version {} of {} is damaged: {}; run the same deploy again: it "
                    "re-sends the damaged files and repairs the version.".format(
                        version, name, describe_bad(report["bad"]) or "manifest differs"))
            repaired = repair_version(final, staged, expect_manifest)
    previous = current_version(app)
    _switch_link(app, version)
    history = [v for v in _read_history(app) if v != version] + [version]
    _write_atomic(os.path.join(app, "history.json"), json.dumps(history))
    removed = prune(app, history, keep)
    return {"ok": True, "current": version, "previous": previous, "removed": removed,
            "repaired": repaired}


def repair_version(final, staged, expect_manifest=None):
    """Replace a damaged version's files with the staged ones, once every file verifies."""
    report = verify_bundle(final, overlay=staged)
    if not report["ok"]:
        raise AgentError("the files sent to repair {} still fail verification: {}; run deploy "
                         "again.".format(final, describe_bad(report["bad"])))
    if expect_manifest and report["manifest_sha256"] != expect_manifest:
        raise AgentError("the repaired manifest is not the one being deployed; run deploy again.")
    replaced = []
    for folder, _dirs, names in os.walk(staged):
        for name in names:
            source = os.path.join(folder, name)
            target = os.path.join(final, os.path.relpath(source, staged))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)  # one file at a time, each atomic
            replaced.append(os.path.relpath(source, staged))
    shutil.rmtree(staged, ignore_errors=True)
    return sorted(replaced)


def prune(app, history, keep):
    """Delete versions beyond the newest ``keep`` (never the current one)."""
    current = current_version(app)
    keep_set = set(history[-keep:]) | {current}
    removed = []
    versions = os.path.join(app, "versions")
    for version in sorted(os.listdir(versions)) if os.path.isdir(versions) else []:
        if version not in keep_set:
            shutil.rmtree(os.path.join(versions, version), ignore_errors=True)
            removed.append(version)
    return removed


def deployed_names(root):
    folder = os.path.join(root, "deployments")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def kept_versions(app):
    folder = os.path.join(app, "versions")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _describe_kept(kept, current):
    return ", ".join(v + (" (current)" if v == current else "") for v in kept) or "none"


def _rollback_target(root, name, app, current, kept):
    """The version to switch back to: the one activated before ``current`` that is still kept."""
    if not kept:
        names = deployed_names(root)
        raise AgentError("nothing named {!r} was ever deployed under {} (deployed names: {}). Use "
                         "the deployment name: the bundle's name, or deploy's --name.".format(
                             name, root, ", ".join(names) or "none"))
    previous = [v for v in _read_history(app) if v != current and v in kept]
    if previous:
        return previous[-1]
    others = [v for v in kept if v != current]
    hint = ("switch to one with --version ({})".format(", ".join(others)) if others else
            "versions beyond deploy's --keep are pruned; deploy with a larger --keep to keep more")
    raise AgentError(f"{name} has no previous version to roll back to (current: {current}); {hint}.")


def rollback(root, name, to_version=None):
    """Switch back to the version activated before the current one (or ``to_version``).

    The history is a stack of activations: the current version leaves it, so a second
    rollback goes one step further back (as long as that version is still kept). The
    version switched to is verified first; a damaged one is refused.
    """
    app = _app_dir(root, name)
    current = current_version(app)
    kept = kept_versions(app)
    if to_version is None:
        to_version = _rollback_target(root, name, app, current, kept)
    elif to_version not in kept:
        raise AgentError(f"version {to_version} of {name} is not on the device; versions kept there: {_describe_kept(kept, current)}. Pass one "
                         "of them to --version.")
    report = check_version(app, to_version)
    if not report["ok"]:
        raise AgentError(
            "version {} of {} is damaged on the device: {}; refusing to switch to it (current "
            "stays {}). Repair it by deploying that bundle again (`edge-ssl deploy BUNDLE --to "
            "TARGET --name {}`): deploy re-sends the damaged files and verifies them.".format(
                to_version, name, describe_bad(report["bad"]), current, name))
    remaining = [v for v in _read_history(app) if v != current]
    _switch_link(app, to_version)
    history = [v for v in remaining if v != to_version] + [to_version]
    _write_atomic(os.path.join(app, "history.json"), json.dumps(history))
    return {"ok": True, "current": to_version, "previous": current, "verified_files": report["files"],
            "kept": kept}


def check_deployments(root, name=None, version=None):
    """Verify `current` of every deployment under root (or of ``name``; or its ``version``)."""
    report = {}
    for each in [name] if name else deployed_names(root):
        app = _app_dir(root, each)
        current = current_version(app)
        chosen = version or current
        entry = {"current": current, "version": chosen, "kept": kept_versions(app)}
        if chosen is not None:
            entry.update(check_version(app, chosen))
        report[each] = entry
    return {"ok": True, "deployments": report}


def status(root, name):
    app = _app_dir(root, name)
    versions_dir = os.path.join(app, "versions")
    staging_dir = os.path.join(app, "staging")
    return {
        "ok": True,
        "current": current_version(app),
        "versions": sorted(os.listdir(versions_dir)) if os.path.isdir(versions_dir) else [],
        "staging": sorted(os.listdir(staging_dir)) if os.path.isdir(staging_dir) else [],
        "history": _read_history(app),
    }


# ---------------------------------------------------------------- device facts
def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00\n ")
    except OSError:
        return None


def _run(argv, timeout=10):
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        return out.returncode, out.stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)


def _module_light(name):
    """Version of an installed module without importing it (importing onnxruntime takes ~1 s)."""
    import importlib.util

    try:
        if importlib.util.find_spec(name) is None:
            return {"missing": f"No module named {name!r}"}
        import importlib.metadata as metadata  # Python 3.8+

        dist = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu")}.get(name, (name,))
        for candidate in dist:
            try:
                return {"version": metadata.version(candidate)}
            except metadata.PackageNotFoundError:
                continue
    except (ImportError, ValueError):
        pass
    return _module(name)


def _module(name):
    try:
        module = __import__(name)
        return {"version": getattr(module, "__version__", "?")}
    except Exception as exc:  # a broken install is a finding, not a crash
        return {"missing": f"{type(exc).__name__}: {exc}"}


def nvpmodel_state():
    """Raw `nvpmodel -q` output (parsed on the host by edge_ssl.devices.detect), None off Jetson."""
    if shutil.which("nvpmodel") is None:
        return None
    code, out = _run(["nvpmodel", "-q"])
    return {"exit": code, "raw": (out or "").strip()[:400]}


def clocks_pinned():
    """True when the GPU min clock equals its max (what jetson_clocks does), None if unknown."""
    for folder in ("/sys/devices/gpu.0/devfreq", "/sys/devices/platform/gpu.0/devfreq",
                   "/sys/devices/platform/bus@0/17000000.gpu/devfreq"):
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            low = _read(os.path.join(folder, entry, "min_freq"))
            high = _read(os.path.join(folder, entry, "max_freq"))
            if low and high:
                return low == high
    return None


def temperatures():
    temps = {}
    base = "/sys/class/thermal"
    for zone in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        kind = _read(os.path.join(base, zone, "type"))
        value = _read(os.path.join(base, zone, "temp"))
        if kind and value and value.lstrip("-").isdigit():
            temps[kind] = int(value) / 1000.0
    return temps


def memory_info():
    info = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            info[key] = int(rest.split()[0]) * 1024
    return info


def info(root, name=None, light=False):
    """What the device offers (doctor): python, numpy, runtimes, JetPack, clocks, space.

    With ``name``, also the state of that deployment (saves a round trip on slow links).
    """
    os.makedirs(root, exist_ok=True)
    disk = shutil.disk_usage(root)
    probe = _module_light if light else _module
    ort = probe("onnxruntime")
    if "version" in ort and not light:
        import onnxruntime

        ort["providers"] = list(onnxruntime.get_available_providers())
    trtexec = next((p for p in TRTEXEC_CANDIDATES if os.path.isfile(p)), shutil.which("trtexec"))
    return {
        "ok": True,
        "agent_version": AGENT_VERSION,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "machine": platform.machine(),
        "hostname": platform.node(),
        "numpy": probe("numpy"),
        "onnxruntime": ort,
        "tensorrt": probe("tensorrt"),
        "trtexec": trtexec,
        "device_tree_model": _read("/proc/device-tree/model"),
        "nv_tegra_release": _read("/etc/nv_tegra_release"),
        "nvpmodel": nvpmodel_state(),
        "clocks_pinned": clocks_pinned(),
        "temperatures_c": temperatures(),
        "memory": memory_info(),
        "disk": {"path": root, "free": disk.free, "total": disk.total},
        "deployment": status(root, name) if name else None,
    }


# ---------------------------------------------------------------- bench
class Tegrastats:
    """Runs `tegrastats --interval MS` in the background and keeps its raw lines."""

    def __init__(self, interval_ms):
        self.proc = None
        self.interval_ms = interval_ms
        if shutil.which("tegrastats"):
            self.proc = subprocess.Popen(
                ["tegrastats", "--interval", str(interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )

    def stop(self):
        if self.proc is None:
            return []
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return [line for line in out.decode("utf-8", "replace").splitlines() if line.strip()]


def _require_numpy():
    try:
        import numpy
    except ImportError as exc:
        raise AgentError(
            f"numpy is not importable by {sys.executable} ({exc}); install it on the device: "
            "sudo apt install python3-numpy (or pip3 install numpy)."
        ) from None
    return numpy


def _kit_module(name):
    """A host module shipped beside this file (stats.py, batch_sizes.py), else edge_ssl's."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return importlib.import_module("edge_ssl.runtime." + name)


def _ort_session(model_path, threads):
    try:
        import onnxruntime
    except ImportError as exc:
        raise AgentError(
            f"onnxruntime is not importable by {sys.executable} ({exc}). On Jetson install NVIDIA's aarch64 wheel "
            "for your JetPack (Jetson Zoo: onnxruntime-gpu), or use --backend trtexec with "
            "TensorRT from JetPack."
        ) from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in onnxruntime.get_available_providers()]
    providers.append("CPUExecutionProvider")
    return onnxruntime.InferenceSession(model_path, sess_options=options, providers=providers)


def _time_calls(fn, warmup_s, duration_s, iterations):
    end_warm = time.perf_counter() + warmup_s
    fn()
    while time.perf_counter() < end_warm:
        fn()
    samples = []
    stop = time.perf_counter() + duration_s
    while (len(samples) < iterations) if iterations else (time.perf_counter() < stop or not samples):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def bench_ort(folder, batch_sizes, warmup_s, duration_s, iterations, threads):
    """Latency of model.onnx in ``folder`` per batch size (random normalized input)."""
    numpy = _require_numpy()
    stats = _kit_module("stats")

    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    session = _ort_session(os.path.join(folder, "model.onnx"), threads)
    input_name = session.get_inputs()[0].name
    shape = manifest["input"]["shape"]
    rng = numpy.random.default_rng(0)
    results = {}
    for batch in batch_sizes:
        data = rng.standard_normal((batch,) + tuple(shape)).astype(numpy.float32)
        feed = {input_name: data}
        samples = _time_calls(lambda feed=feed: session.run(None, feed), warmup_s, duration_s, iterations)
        summary = stats.latency_summary(samples)
        summary["throughput"] = stats.throughput_per_s(batch, summary["mean"])
        results[str(batch)] = summary
    return {"backend": "onnxruntime", "providers": session.get_providers(), "batches": results}


_TRTEXEC_GPU = re.compile(r"GPU Compute Time: ([^\n]*)")
_TRTEXEC_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=?\s*([\d.]+) ms")


def parse_trtexec_gpu_time(text):
    """trtexec's "GPU Compute Time: min = .. ms, ..., percentile(90%) = .. ms" -> dict (ms)."""
    lines = _TRTEXEC_GPU.findall(text or "")
    if not lines:
        return None
    stats = {}
    for key, pct, value in _TRTEXEC_STAT.findall(lines[-1]):
        name = {"median": "p50"}.get(key, key)
        if pct:
            name = "p" + pct.split(".")[0]
        stats[name] = float(value)
    return stats if "mean" in stats else None


def bench_trtexec(folder, engine, batch_sizes, warmup_s, duration_s):
    """Latency of a TensorRT plan via trtexec (its GPU compute time summary)."""
    trtexec = next((p for p in TRTEXEC_CANDIDATES if os.path.isfile(p)), shutil.which("trtexec"))
    if trtexec is None:
        raise AgentError("trtexec not found (looked in {} and PATH); it ships with JetPack's TensorRT.".format(", ".join(TRTEXEC_CANDIDATES)))
    results = {}
    for batch in batch_sizes:
        argv = [trtexec, "--loadEngine=" + os.path.join(folder, engine),
                f"--warmUp={int(warmup_s * 1000)}", f"--duration={max(1, int(duration_s))}"]
        code, out = _run(argv, timeout=warmup_s + duration_s + 120)
        stats = parse_trtexec_gpu_time(out)
        if code != 0 or stats is None:
            raise AgentError("trtexec failed (exit {}): {}".format(code, (out or "")[-600:]))
        stats.update(throughput=1000.0 * batch / stats["mean"], source="trtexec GPU compute time")
        results[str(batch)] = stats
    return {"backend": "trtexec", "engine": engine, "batches": results}


def bench(args):
    folder = args.folder
    if not os.path.isfile(os.path.join(folder, "manifest.json")):
        raise AgentError(f"{folder} holds no deployed bundle; deploy one first.")
    batches = _kit_module("batch_sizes").parse_batch_sizes(args.batch_sizes, "--batch-sizes")
    sampler = Tegrastats(args.tegrastats_ms) if args.tegrastats_ms else None
    start = time.time()
    try:
        if args.backend == "trtexec":
            report = bench_trtexec(folder, args.engine, batches, args.warmup, args.duration)
        else:
            report = bench_ort(folder, batches, args.warmup, args.duration, args.iterations, args.threads)
    finally:
        lines = sampler.stop() if sampler else []
    report.update(ok=True, seconds=time.time() - start, tegrastats=lines,
                  tegrastats_interval_ms=args.tegrastats_ms or None)
    return report


def build_engine(folder, precision, out_name, timeout, extra):
    """Build a TensorRT plan from model.onnx with trtexec into folder/engines/ (atomically)."""
    trtexec = next((p for p in TRTEXEC_CANDIDATES if os.path.isfile(p)), shutil.which("trtexec"))
    if trtexec is None:
        raise AgentError("trtexec not found; it ships with JetPack's TensorRT (/usr/src/tensorrt/bin).")
    engines = os.path.join(folder, "engines")
    os.makedirs(engines, exist_ok=True)
    target = os.path.join(engines, out_name)
    tmp = target + ".partial"
    argv = [trtexec, "--onnx=" + os.path.join(folder, "model.onnx"), "--saveEngine=" + tmp]
    if precision in ("fp16", "int8"):
        argv.append("--" + precision)
    argv.extend(extra)
    code, out = _run(argv, timeout=timeout)
    if code != 0 or not os.path.isfile(tmp):
        raise AgentError("trtexec could not build {} (exit {}): {}".format(out_name, code, (out or "")[-800:]))
    os.replace(tmp, target)
    return {"ok": True, "engine": os.path.relpath(target, folder), "bytes": os.path.getsize(target),
            "sha256": sha256_file(target), "argv": argv}


# ---------------------------------------------------------------- command line
def _parser():
    parser = argparse.ArgumentParser(prog="agent.py", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    p = sub.add_parser("info")
    p.add_argument("--root", default=".")
    p.add_argument("--name", default=None)
    p.add_argument("--light", action="store_true", help="Find modules without importing them (faster).")
    p = sub.add_parser("stat")
    p.add_argument("folder")
    p = sub.add_parser("verify")
    p.add_argument("folder")
    p = sub.add_parser("check", help="Verify deployed versions (default: every deployment's current).")
    p.add_argument("--root", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--version", default=None)
    for name in ("activate", "rollback", "status"):
        p = sub.add_parser(name)
        p.add_argument("--root", required=True)
        p.add_argument("--name", required=True)
        if name == "activate":
            p.add_argument("--version", required=True)
            p.add_argument("--keep", type=int, default=3)
            p.add_argument("--expect-manifest", default=None)
        if name == "rollback":
            p.add_argument("--to", default=None)
    p = sub.add_parser("bench")
    p.add_argument("folder")
    p.add_argument("--backend", choices=("onnxruntime", "trtexec"), default="onnxruntime")
    p.add_argument("--engine", default=None)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--iterations", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tegrastats-ms", type=int, default=0)
    p = sub.add_parser("build-engine")
    p.add_argument("folder")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--extra", action="append", default=[])
    return parser


def dispatch(args):
    if args.command == "info":
        return info(args.root, args.name, args.light)
    if args.command == "stat":
        return {"ok": True, "files": stat_tree(args.folder)}
    if args.command == "verify":
        return verify_bundle(args.folder)
    if args.command == "check":
        return check_deployments(args.root, args.name, args.version)
    if args.command == "activate":
        return activate(args.root, args.name, args.version, args.keep, args.expect_manifest)
    if args.command == "rollback":
        return rollback(args.root, args.name, args.to)
    if args.command == "status":
        return status(args.root, args.name)
    if args.command == "bench":
        return bench(args)
    return build_engine(args.folder, args.precision, args.out, args.timeout, args.extra)


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command in ("activate", "rollback") and hasattr(signal, "SIGHUP"):
        # a dropped SSH session must not stop a switch halfway: finish, then exit
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        result = dispatch(args)
    except AgentError as exc:
        result = {"ok": False, "error": str(exc)}
    except (OSError, ValueError) as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
