"""The adaptation run: statistics pass, memory plan, guarded SSL steps, checkpoints, the new bundle."""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_ssl.adapt.bn import (
    bn_input_statistics,
    bn_statistics,
    carry_step_change,
    reestimate_bn_stats,
)
from edge_ssl.adapt.config import MIN_BATCH, AdaptConfig, default_budget_mb
from edge_ssl.adapt.guard import GuardConfig, check_embeddings, mean_cosine
from edge_ssl.adapt.inputs import (
    AdaptEvent,
    AdaptResult,
    checkpoint_path,
    data_fingerprint,
    lineage_settings,
    split_holdout,
    write_adapted,
)
from edge_ssl.adapt.lora import merge_lora
from edge_ssl.adapt.memory import MIB, process_peak_rss_mb
from edge_ssl.adapt.plan import AdaptPlan, plan_adaptation
from edge_ssl.adapt.step import (
    SampleSelector,
    backward_blocks,
    build_method,
    check_alignment,
    disable_checkpointing,
    enable_checkpointing,
    is_out_of_memory,
    iterate_batches,
    step_loss,
)
from edge_ssl.adapt.trainables import apply_trainables
from edge_ssl.bundle import Bundle, atomic_write_bytes
from edge_ssl.config import config_to_dict
from edge_ssl.data.sources import ImageDataset
from edge_ssl.data.views import ViewAugment, view_preset
from edge_ssl.device import resolve_device
from edge_ssl.errors import CheckpointError, TrainingError
from edge_ssl.evaluate import embed, embedding_health

_STATS_BATCH = 64
_EMBED_BATCH = 128


class AdaptRun:
    """State of one run; ``train()`` then ``finish()``. Not reused across runs."""

    def __init__(self, encoder: torch.nn.Module, data: ImageDataset, out: Path, config: AdaptConfig,
                 device: torch.device, progress: Callable[[AdaptEvent], None],
                 replay: np.ndarray | None = None) -> None:
        self.encoder, self.data, self.out, self.config = encoder, data, out, config
        self.device, self.progress = device, progress
        self.images = data.images
        self.train_idx, self.hold_idx = split_holdout(len(data), config)
        self.targets = embed(encoder, self.images, batch_size=_EMBED_BATCH, device=str(device))
        self.replay: tuple[np.ndarray, np.ndarray] | None = None  # (clean images, deployed embeddings)
        if replay is not None and config.replay_weight > 0:
            self.replay = (replay, embed(encoder, replay, batch_size=_EMBED_BATCH, device=str(device)))
        self.distill_targets = self.targets  # replaced after the statistics pass (distill_to)
        self.health_before = embedding_health(self.targets[self.hold_idx])
        self.source_bn = bn_statistics(encoder)  # the deployed statistics every bn_prior mix keeps
        self.deep_before: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see carry_step_change
        self.guard_config = GuardConfig(config.min_agreement, config.min_rank_ratio)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.guard: list[dict[str, Any]] = []
        self.stopped: str | None = None
        self.good_state: dict[str, torch.Tensor] | None = None
        self.peak_step_mb = 0.0
        self.step_seconds: list[float] = []

    # ---------------------------------------------------------------- setup
    def prepare(self, budget_mb: float, budget_source: str) -> None:
        """AdaBN statistics, then the memory plan, then the trainable subset and optimizer."""
        if self.config.bn_stats:
            self.progress(AdaptEvent("stats", 0, self.config.steps, message="re-estimating BN statistics"))
            reestimate_bn_stats(self.encoder, self._stats_batches(), prior=self.config.bn_prior,
                                source=self.source_bn, depth=self.config.bn_depth)
            if self.config.bn_depth < 1:
                self.deep_before = bn_input_statistics(self.encoder, self._stats_batches())
            if self.config.distill_to == "bn-adapted":
                self.distill_targets = embed(self.encoder, self.images, batch_size=_EMBED_BATCH,
                                             device=str(self.device))
        self.progress(AdaptEvent("plan", 0, self.config.steps, message="measuring step memory"))
        self.plan = plan_adaptation(self.encoder, self.images[self.train_idx],
                                    self.targets[self.train_idx], self.config,
                                    budget_mb=budget_mb, budget_source=budget_source,
                                    replay=self.replay)
        self._build(self.plan.trainable, self.plan.checkpointing, self.plan.batch_size)
        self.good_state = self._encoder_state()

    def _build(self, trainable: str, checkpointing: bool, batch: int) -> None:
        self.trainable = apply_trainables(self.encoder, trainable, lora_rank=self.config.lora_rank)
        self.batch = batch
        self.method = build_method(self.encoder, self.config).to(self.device)
        self.views = ViewAugment(view_preset(self.config.method, self.encoder.spec.input.image_size),
                                 self.encoder.spec.input).to(self.device)
        self.blocks = backward_blocks(self.encoder.backbone) if checkpointing else []
        enable_checkpointing(self.blocks)
        params = [p for p in self.method.parameters() if p.requires_grad]
        if self.config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.config.lr, momentum=0.9,
                                             weight_decay=self.config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=self.config.lr,
                                               weight_decay=self.config.weight_decay)
        self.selector = SampleSelector(self.config.select_threshold) if self.config.select else None

    def _encoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    # ---------------------------------------------------------------- steps
    def train(self) -> None:
        """Gradient steps until ``config.steps``, the guard stops the run, or nothing is trainable."""
        steps = self.config.steps if self.trainable.takes_gradient_steps else 0
        while self.step < steps and self.stopped is None:
            self._one_step(steps)
            if self.step % self.config.guard_every == 0 or self.step == steps:
                self._guard_check(steps)
            if self.step % self.config.checkpoint_every == 0 and self.step < steps:
                self.save_checkpoint()

    def _batch_indices(self) -> np.ndarray:
        rng = np.random.default_rng((self.config.seed, self.step))
        size = min(self.batch, len(self.train_idx))
        return self.train_idx[np.sort(rng.choice(len(self.train_idx), size, replace=False))]

    def _one_step(self, steps: int) -> None:
        index = self._batch_indices()
        if self.selector is not None:
            index = index[self.selector.select(self.targets[index], MIN_BATCH)]
        self.encoder.eval()  # BN statistics stay as AdaBN set them; SSL views would skew them
        self.method.projector.train()
        self.method.predictor.train()
        torch.manual_seed(self.config.seed * 100_003 + self.step)
        while True:
            try:
                logs = self._forward_backward(index)
                break
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                index = self._shrink_after_oom(index, exc)
        self.step += 1
        logs["step"], logs["batch"] = self.step, len(index)
        self.history.append(logs)
        self.progress(AdaptEvent("step", self.step, steps, loss=logs["loss"], batch=len(index)))

    def _replay_batch(self, size: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``size`` replay images and their targets for this step (seeded, so --resume repeats it)."""
        if self.replay is None:
            return None
        images, targets = self.replay
        rng = np.random.default_rng((self.config.seed, self.step, 1))
        pick = np.sort(rng.choice(len(images), size, replace=len(images) < size))
        return images[pick], targets[pick]

    def _forward_backward(self, index: np.ndarray) -> dict[str, float]:
        started = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs, _ = step_loss(self.method, self.views, self.images[index], self.distill_targets[index],
                                  self.config, self.device, self._replay_batch(len(index)))
        if not torch.isfinite(loss):
            raise TrainingError(
                f"adaptation loss became {float(loss)} at step {self.step + 1}; lower --lr "
                f"(now {self.config.lr}) or use a cheaper --trainable such as norm or bn-stats."
            )
        loss.backward()
        self.optimizer.step()
        if hasattr(self.method, "momentum_update"):
            self.method.momentum_update(min(1.0, (self.step + 1) / self.config.steps))
        if cuda:
            self.peak_step_mb = max(self.peak_step_mb, torch.cuda.max_memory_allocated(self.device) / MIB)
        self.step_seconds.append(time.perf_counter() - started)
        return logs

    def _shrink_after_oom(self, index: np.ndarray, exc: BaseException) -> np.ndarray:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        smaller = len(index) // 2
        if smaller < MIN_BATCH:
            raise TrainingError(
                f"out of memory at batch {len(index)} even after halving ({exc}); the device "
                f"cannot run a step of trainable={self.trainable.kind}. Lower --budget-mb so the "
                "planner picks a cheaper subset, or use --trainable bn-stats."
            ) from None
        self.batch = smaller
        self.progress(AdaptEvent("step", self.step, self.config.steps, batch=smaller,
                                 message=f"out of memory: batch reduced to {smaller}, step retried"))
        return index[:smaller]

    # ---------------------------------------------------------------- guard
    def _stats_batches(self) -> Iterator[torch.Tensor]:
        """The training images once, in batches: what every BN statistics pass reads."""
        return iterate_batches(self.images[self.train_idx], _STATS_BATCH, self.device,
                               self.encoder.spec.input)

    def _hold_embeddings(self) -> np.ndarray:
        return embed(self.encoder, self.images[self.hold_idx], batch_size=_EMBED_BATCH,
                     device=str(self.device))

    def _guard_check(self, steps: int) -> None:
        report = check_embeddings(self.step, self._hold_embeddings(), self.targets[self.hold_idx],
                                  self.health_before, self.guard_config)
        self.guard.append(report.to_dict())
        self.progress(AdaptEvent("guard", self.step, steps, message=report.reason or "ok"))
        if report.ok:
            self.good_state = self._encoder_state()
            return
        self.stopped = f"guard at step {self.step}: {report.reason}; kept the last good weights"
        self.encoder.load_state_dict(self.good_state)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "kind": "edge-ssl-adapt", "step": self.step, "batch": self.batch,
            "plan": self.plan.to_dict(), "settings": config_to_dict(self.config),
            "fingerprint": data_fingerprint(self.images), "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(), "good": self.good_state,
            "history": self.history, "guard": self.guard,
            "selector": None if self.selector is None or self.selector.mean is None
            else torch.from_numpy(np.asarray(self.selector.mean, dtype=np.float32)),
            "step_seconds": self.step_seconds, "peak_step_mb": self.peak_step_mb,
            "distill_targets": torch.from_numpy(np.ascontiguousarray(self.distill_targets)),
            "deep_before": self.deep_before,
            "replay": None if self.replay is None else data_fingerprint(self.replay[0]),
        }

    def save_checkpoint(self) -> None:
        path = checkpoint_path(self.out)
        buffer = io.BytesIO()
        torch.save(self.checkpoint_state(), buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:
            raise TrainingError(f"could not write checkpoint {path}: {exc.strerror or exc} "
                                "(is the disk full?); the previous checkpoint is kept.") from exc

    def restore(self, state: dict[str, Any]) -> None:
        plan = state["plan"]
        self.plan = AdaptPlan(plan["trainable"], plan["checkpointing"], plan["batch_size"],
                              plan["expected_step_mb"], plan["budget_mb"], plan["budget_source"])
        self._build(plan["trainable"], plan["checkpointing"], int(state["batch"]))
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.good_state = int(state["step"]), state["good"]
        self.history, self.guard = list(state["history"]), list(state["guard"])
        self.step_seconds = list(state.get("step_seconds", []))
        self.peak_step_mb = float(state.get("peak_step_mb", 0.0))
        deep = state.get("deep_before")  # the checkpoint is read to the CPU
        self.deep_before = None if deep is None else [
            (mean.to(self.device), var.to(self.device)) for mean, var in deep]
        if state.get("distill_targets") is not None:
            self.distill_targets = state["distill_targets"].numpy()
        if self.selector is not None and state.get("selector") is not None:
            self.selector.mean = state["selector"].numpy().astype(np.float64)

    # ---------------------------------------------------------------- finish
    def finish(self, steps: int) -> tuple[np.ndarray, float]:
        """Refresh BN statistics for the new weights, merge adapters; (held-back embeddings, agreement)."""
        disable_checkpointing(self.blocks)
        changed = self.step > 0 and self.stopped is None
        if changed and self.config.bn_stats:
            reestimate_bn_stats(self.encoder, self._stats_batches(), prior=self.config.bn_prior,
                                source=self.source_bn, depth=self.config.bn_depth)
            if self.deep_before is not None and self.config.align_weight == 0:
                carry_step_change(self.encoder, self.source_bn, self.deep_before,
                                  bn_input_statistics(self.encoder, self._stats_batches()),
                                  depth=self.config.bn_depth)
            report = check_embeddings(self.step, self._hold_embeddings(),
                                      self.targets[self.hold_idx], self.health_before,
                                      self.guard_config)
            self.guard.append({**report.to_dict(), "after": "bn statistics refresh"})
            if not report.ok:
                self.stopped = f"guard after the final statistics pass: {report.reason}"
                self.encoder.load_state_dict(self.good_state)
        merge_lora(self.encoder)
        self.encoder.requires_grad_(False)
        held = self._hold_embeddings()
        return held, mean_cosine(held, self.targets[self.hold_idx])


def load_checkpoint(path: Path, config: AdaptConfig, images: np.ndarray,
                    replay: np.ndarray | None = None) -> dict[str, Any]:
    """Read and check an adaptation checkpoint: same data, replay images and settings (steps may differ)."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
                              f"delete {path.parent} and start without --resume.") from None
    if not isinstance(state, dict) or state.get("kind") != "edge-ssl-adapt":
        raise CheckpointError(f"{path} is not an edge-ssl adaptation checkpoint.")
    if state["fingerprint"] != data_fingerprint(images):
        raise CheckpointError(f"{path} was written for other local images (fingerprint "
                              f"{state['fingerprint']}); resume with the same --data.")
    used = replay if replay is not None and config.replay_weight > 0 else None
    if state.get("replay") != (None if used is None else data_fingerprint(used)):
        raise CheckpointError(f"{path} was written with other replay images; resume with the same ones.")
    ours = {k: v for k, v in config_to_dict(config).items() if k != "steps"}
    theirs = {k: v for k, v in state["settings"].items() if k != "steps"}
    if ours != theirs:
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise CheckpointError(f"{path} was written with other settings ({', '.join(diff)} differ); "
                              "resume with the same options (only --steps may change).")
    return state


def run_adaptation(
    deployed: Bundle, weights: Bundle, data: ImageDataset, out: Path, config: AdaptConfig, *,
    resume: bool, overwrite: bool, profile_memory_gb: float | None, export: str,
    progress: Callable[[AdaptEvent], None], replay: np.ndarray | None = None,
    bank: tuple[np.ndarray, np.ndarray] | None = None, profile: str | None = None, power: Any = None,
) -> AdaptResult:
    """The stage body behind :func:`edge_ssl.adapt.api.adapt` (inputs already checked).
    ``bank``: labeled clean images for choosing the kept weights (edge_ssl.adapt.select).
    ``power``: samples power during the steps (edge_ssl.devices.remote_adapt.StepPowerMeter)."""
    from edge_ssl.models import count_parameters

    device = resolve_device(config.device)
    run = _start_run(weights, data, out, config, device, progress, replay, resume, profile_memory_gb)
    with power.sampling() if power is not None else contextlib.nullcontext():
        run.train()
    steps = config.steps if run.trainable.takes_gradient_steps else 0
    held, agreement = run.finish(steps)
    selection, candidates = _keep_best(run, weights, bank, device)
    if selection is not None:
        held = run._hold_embeddings()
        agreement = mean_cosine(held, run.targets[run.hold_idx])
    progress(AdaptEvent("write", run.step, steps, message=f"writing {out}"))
    encoder_cpu = copy.deepcopy(run.encoder).cpu().eval()
    step_mb = run.peak_step_mb if device.type == "cuda" else run.plan.expected_mb
    adapt_metrics = _adapt_metrics(run, device, step_mb, held, agreement)
    adapt_metrics["selection"] = None if selection is None else selection.to_dict()
    seconds = float(np.mean(run.step_seconds)) if run.step_seconds else None
    adapt_metrics["device_cost"] = _device_cost(run, encoder_cpu, seconds, adapt_metrics, profile)
    if power is not None and adapt_metrics["device_cost"] is not None:
        adapt_metrics["device_cost"]["energy"] = power.measured(seconds)
    settings = lineage_settings(config, data, run.plan.to_dict(), {
        "steps_done": run.step, "peak_step_mb": adapt_metrics["peak_step_mb"],
        "health_before": adapt_metrics["health_before"], "health_after": adapt_metrics["health_after"],
        "device": str(device), "resumed": resume, "parent_with_weights": str(weights.path),
        "selection": adapt_metrics["selection"],
        "replay": None if run.replay is None else {"images": len(run.replay[0]),
                                                    "fingerprint": data_fingerprint(run.replay[0])}})
    from edge_ssl.adapt.export import export_artifacts
    from edge_ssl.adapt.replay import REPLAY_FILE, replay_file
    from edge_ssl.adapt.tune import SETTINGS_FILE, settings_file

    # the next adaptation of the result uses the same settings and replay images
    carried = {SETTINGS_FILE: settings_file(deployed, weights), REPLAY_FILE: replay_file(deployed, weights)}
    with export_artifacts(encoder_cpu, deployed, export) as (extra_files, export_info):
        extra_files = {**extra_files, **{name: path for name, path in carried.items() if path is not None}}
        adapt_metrics["export"] = export_info
        metrics = {"params": count_parameters(encoder_cpu), "adapt": adapt_metrics,
                   **_export_metrics(deployed, export_info, extra_files)}
        bundle = write_adapted(out, encoder_cpu, deployed.child_lineage("adapt", settings),
                               metrics, overwrite=overwrite, extra_files=extra_files,
                               weights=weights, images=data.images)
    shutil.rmtree(checkpoint_path(out).parent, ignore_errors=True)
    return AdaptResult(run.plan.to_dict(), run.step, run.stopped, run.health_before,
                       embedding_health(held), agreement, step_mb, seconds, run.history,
                       run.guard, export_info, adapt_metrics["selection"],
                       {n: copy.deepcopy(m).cpu() for n, m in candidates.items()},
                       bundle=bundle, metrics=adapt_metrics)


def _start_run(weights: Bundle, data: ImageDataset, out: Path, config: AdaptConfig, device: torch.device,
               progress: Callable[[AdaptEvent], None], replay: np.ndarray | None, resume: bool,
               profile_memory_gb: float | None) -> AdaptRun:
    """The run, planned within the memory budget or restored from its checkpoint."""
    from edge_ssl.models import load_encoder

    state = load_checkpoint(checkpoint_path(out), config, data.images, replay) if resume else None
    torch.manual_seed(config.seed)
    encoder = load_encoder(weights).to(device)
    check_alignment(encoder, config)
    run = AdaptRun(encoder, data, out, config, device, progress, replay)
    if state is not None:
        run.restore(state)
        return run
    budget, source = (config.budget_mb, "--budget-mb") if config.budget_mb else default_budget_mb(
        profile_memory_gb=profile_memory_gb, device_type=device.type)
    run.prepare(budget, source)
    return run


def _device_cost(run: AdaptRun, encoder: Any, seconds: float | None, metrics: dict[str, Any],
                 profile: str | None) -> dict[str, Any] | None:
    """The step's cost measured here, and predicted on ``profile``'s board when given."""
    from edge_ssl.adapt.cost import step_cost

    if not run.step_seconds:
        return None
    return step_cost(encoder, seconds_per_step=seconds, peak_step_mb=metrics["peak_step_mb"],
                     batch=run.batch, views=2, profile=profile)


def _keep_best(run: AdaptRun, weights: Bundle, bank: tuple[np.ndarray, np.ndarray] | None,
               device: torch.device) -> tuple[Any, dict[str, torch.nn.Module]]:
    """Never worse than not adapting: keep the best of the unadapted weights, AdaBN alone and
    the adapted weights on the held-back slice (edge_ssl.adapt.select); (selection, candidates)."""
    if not run.config.keep_best:
        return None, {}
    from edge_ssl.adapt.select import keep_best
    from edge_ssl.models import load_encoder

    encoders, selection = keep_best(run.encoder, load_encoder(weights), run.config,
                                    run.images[run.train_idx], run.images[run.hold_idx], bank, device)
    run.encoder = encoders[selection.kept]
    scores = ", ".join(f"{k} {v:.3f}" for k, v in selection.scores.items() if v is not None)
    run.progress(AdaptEvent("guard", run.step, run.config.steps,
                            message=f"kept {selection.kept} ({selection.criterion}: {scores})"))
    return selection, encoders


def _adapt_metrics(run: AdaptRun, device: torch.device, step_mb: float, held: np.ndarray,
                   agreement: float) -> dict[str, Any]:
    return {
        "steps": run.step, "trainable": run.trainable.to_dict(), "batch_size": run.batch,
        "peak_step_mb": round(step_mb, 2),
        "memory_measure": ("cuda max_memory_allocated" if device.type == "cuda" else
                           "byte model: weights + inputs + saved activations + grads + optimizer"),
        "process_peak_rss_mb": process_peak_rss_mb(),
        "health_before": run.health_before.to_dict(),
        "health_after": embedding_health(held).to_dict(), "agreement_after": agreement,
        "stopped": run.stopped, "guard": run.guard,
    }


def _export_metrics(parent: Bundle, info: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """metrics['export'] / ['engines'] as the runtime writes them, so later refits reproduce the graph."""
    metrics: dict[str, Any] = {}
    if isinstance(info.get("onnx"), dict):
        metrics["export"] = {k: v for k, v in info["onnx"].items() if k != "exported"}
    engines = parent.manifest.metrics.get("engines")
    if isinstance(engines, dict):
        metrics["engines"] = {k: {**v, "refit_from": "adapt"} for k, v in engines.items() if k in files}
    return metrics
