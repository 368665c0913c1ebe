"""Run one job on many targets at once; one host failing never stops the others."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_ssl.devices.target import SSHSettings, Target, parse_target

from edge_ssl.errors import ConfigError, EdgeSSLError


@dataclass(frozen=True)
class HostOutcome:
    """One target's row in the fleet table."""

    target: str
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_hosts_file(path: str | Path) -> list[str]:
    """Targets from a file: one per line; blank lines and '#' comments ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"hosts file {path} cannot be read: {exc}.") from exc
    hosts = [line.split("#", 1)[0].strip() for line in lines]
    hosts = [h for h in hosts if h]
    if not hosts:
        raise ConfigError(f"hosts file {path} lists no targets (one ssh://user@host per line).")
    return hosts


def collect_targets(to: Sequence[str] | None, hosts_file: str | Path | None) -> list[str]:
    """--to values plus the hosts file, in order, without duplicates."""
    specs = list(to or []) + (read_hosts_file(hosts_file) if hosts_file else [])
    if not specs:
        raise ConfigError("no target given: pass --to ssh://user@host (repeatable) or --hosts FILE.")
    return list(dict.fromkeys(specs))


def _run_one(spec: str, settings: SSHSettings, job: Callable[[Target], dict[str, Any]]) -> HostOutcome:
    try:
        with parse_target(spec, settings) as target:
            return HostOutcome(target=target.label, ok=True, result=job(target))
    except EdgeSSLError as exc:
        return HostOutcome(target=spec, ok=False, error=str(exc))


def run_on_fleet(specs: Sequence[str], settings: SSHSettings,
                 job: Callable[[Target], dict[str, Any]], max_workers: int = 8) -> list[HostOutcome]:
    """``job(target)`` on every target concurrently; outcomes in the order given."""
    if len(specs) == 1:
        return [_run_one(specs[0], settings, job)]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(specs))) as pool:
        return list(pool.map(lambda spec: _run_one(spec, settings, job), specs))
