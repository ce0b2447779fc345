"""Run output on rank 0: log lines, a tqdm bar in a terminal, metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    """Rank 0 writes; other ranks stay silent (errors are printed by the abort path with a rank).

    In a terminal a tqdm progress bar shows the steps of the epoch; in batch jobs (stderr not a
    TTY) there is one plain line per epoch.
    """

    def __init__(self, run_dir: Path, rank: int, quiet: bool = False) -> None:
        self.run_dir = run_dir
        self.active = rank == 0
        self.quiet = quiet
        self.tty = sys.stderr.isatty() and not os.environ.get("CI")
        self._bar: tqdm | None = None
        self._t0 = time.time()

    def info(self, msg: str) -> None:
        if self.active and not self.quiet:
            if self._bar is not None:
                self._bar.write(msg, file=sys.stderr)
            else:
                print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done: int) -> None:
        if self.active and self.tty and not self.quiet:
            self._bar = tqdm(total=total_steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                             leave=False, file=sys.stderr, dynamic_ncols=True)

    def step(self, loss: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from the full history (atomic), so a resumed run never keeps
        lines of epochs that were trained after its checkpoint."""
        if not self.active:
            return
        text = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in history)
        atomic_write(self.run_dir / "metrics.jsonl", text)

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        if self.active:
            atomic_write(self.run_dir / name, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
