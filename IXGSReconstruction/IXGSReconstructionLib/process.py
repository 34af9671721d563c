"""Run ``ixgs reconstruct`` as a background process and follow its JSON progress.

A separate process (not a thread) keeps Slicer responsive, isolates torch's memory, and makes cancel
exact: killing the process is the cancel, and the engine writes its outputs only on success. The
engine's stdin is a pipe that only this side holds: when Slicer exits or dies the pipe closes and the
engine cancels itself (``ixgs.cli.PARENT_WATCH_ENV``), so no run outlives Slicer. The caller polls
(Slicer: from a QTimer); nothing here needs Qt or touches the scene.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import ixgs
from ixgs.cli import PARENT_WATCH_ENV, settings_arguments
from ixgs.reconstruct import ReconstructionSettings

def reconstruct_command(scan_path: str | os.PathLike, output_path: str | os.PathLike,
                        settings: ReconstructionSettings, python_executable: str | None = None) -> list[str]:
    """``python -m ixgs reconstruct SCAN -o OUT ... --progress json``."""
    return [python_executable or sys.executable, "-m", "ixgs", "reconstruct", str(scan_path),
            "-o", str(output_path), *settings_arguments(settings), "--progress", "json"]


def parse_progress(line: str) -> dict | None:
    """One progress record from a stdout line, or None for any other output (logged by the caller)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or "iteration" not in record or "total" not in record:
        return None
    return record


def format_progress(record: dict) -> str:
    """A status line such as ``"optimize 120/400  loss 0.0123  ETA 0:42"``."""
    text = f"{record.get('stage', 'running')} {record['iteration']}/{record['total']}"
    if record.get("loss") is not None:
        text += f"  loss {float(record['loss']):.4g}"
    if record.get("eta_s") is not None:
        minutes, seconds = divmod(int(round(float(record["eta_s"]))), 60)
        text += f"  ETA {minutes}:{seconds:02d}"
    return text


@dataclass
class ReconstructionProcess:
    """One background reconstruction. ``start`` -> ``poll`` until ``finished`` -> ``output_path``.

    The process writes into a private temporary folder; on cancel or failure that folder is deleted,
    so nothing of a failed run reaches the disk or the scene.
    """

    command_prefix: list[str]
    output_root: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None
    cancelled: bool = False
    error: str = ""
    log: list[str] = field(default_factory=list)
    last_progress: dict | None = None

    def __post_init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self._threads: list[threading.Thread] = []
        self._workdir: Path | None = None

    @classmethod
    def for_scan(cls, scan_path, settings: ReconstructionSettings, python_executable: str | None = None,
                 output_root: Path | None = None) -> "ReconstructionProcess":
        """A run of the engine installed next to this module (its folder is put on PYTHONPATH)."""
        if not (Path(scan_path) / "scan.json").is_file() and Path(scan_path).suffix != ".json":
            raise ValueError(f"{scan_path}: not a scan folder (no scan.json)")
        engine_root = str(Path(ixgs.__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (engine_root, os.environ.get("PYTHONPATH", "")) if p)
        # "{output}" is replaced by start() with a fresh private folder.
        prefix = reconstruct_command(scan_path, "{output}", settings, python_executable)
        return cls(prefix, output_root, {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1", PARENT_WATCH_ENV: "stdin"})

    @property
    def output_path(self) -> Path | None:
        """The finished outputs (volume.nrrd, bone.nrrd, coverage.nrrd, report.json), after success only."""
        if self.returncode == 0 and not self.cancelled and self._workdir is not None:
            return self._workdir / "out"
        return None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self.returncode is None

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("this reconstruction was already started")
        self._workdir = Path(tempfile.mkdtemp(prefix="ixgs-run-", dir=self.output_root))
        command = [str(self._workdir / "out") if part == "{output}" else part for part in self.command_prefix]
        env = {**os.environ, **self.environment}
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            errors="replace", env=env,
            start_new_session=(os.name != "nt"),  # its own process group: cancel reaches torch's workers too
        )
        self._threads = [threading.Thread(target=self._read, args=(self._process.stdout, self._lines), daemon=True),
                         threading.Thread(target=self._collect_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def poll(self) -> list[dict]:
        """New progress records since the last call; sets ``returncode``/``error`` once the process ended."""
        records = self._drain()
        if self._process is not None and self.returncode is None and self._process.poll() is not None:
            for thread in self._threads:
                thread.join(timeout=5)
            records += self._drain()
            self._finish(self._process.returncode)
        return records

    def _drain(self) -> list[dict]:
        records = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return records
            record = parse_progress(line)
            if record is None:
                self.log.append(line.rstrip())
            else:
                records.append(record)
                self.last_progress = record

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until the process ends (scripts and tests; the GUI polls instead)."""
        if self._process is None:
            raise RuntimeError("not started")
        self._process.wait(timeout=timeout_s)
        self.poll()
        return self.returncode

    def cancel(self) -> None:
        """Kill the process (and its children); its temporary outputs are deleted."""
        self.cancelled = True
        if self._process is not None and self._process.poll() is None:
            if os.name != "nt":
                os.killpg(self._process.pid, signal.SIGKILL)
            else:
                self._process.kill()
            self._process.wait()
        if self._process is not None:
            for thread in self._threads:
                thread.join(timeout=5)
            self._drain()
        self._finish(self._process.returncode if self._process is not None else -1)

    def discard(self) -> None:
        """Delete the temporary folder (after the outputs were loaded, or after a failure)."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        if self._process is not None and self._process.stdin is not None:
            self._process.stdin.close()
        if self.cancelled:
            self.error = "cancelled by the user"
        elif returncode != 0:
            lines = [line.strip() for line in self._stderr if line.strip()]
            self.error = lines[-1] if lines else f"reconstruction process exited with code {returncode}"
        elif not (self._workdir / "out" / "volume.nrrd").is_file():
            self.returncode, self.error = -1, "reconstruction reported success but wrote no volume.nrrd"
        if self.error:
            self.discard()

    @staticmethod
    def _read(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)

    def _collect_stderr(self) -> None:
        for line in self._process.stderr:
            self._stderr.append(line)
