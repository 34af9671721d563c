"""Blinded 5-point Likert scoring of reconstructions (optionally mixed with CTs).

The cases are shuffled with a seed that is recorded, shown only under a neutral label ("Case 3"),
and every score is appended to a CSV written atomically, so a crash loses at most the score being
entered. The session's fixed facts (seed, evaluator, question, case list) live in a JSON file next
to the CSV; opening the same CSV again resumes at the first unscored case.
"""
from __future__ import annotations

import csv
import io
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_QUESTION = "Utility for surgical navigation"
SCALE = {1: "very poor", 2: "poor", 3: "acceptable", 4: "good", 5: "excellent"}
COLUMNS = ("evaluator_id", "session_seed", "position", "blinded_label", "case_id", "kind", "source",
           "question", "score", "comment", "time_spent_s", "recorded_utc")


@dataclass(frozen=True)
class Case:
    """One item to score: ``case_id`` is the true identity (kept out of the evaluator's view),
    ``kind`` e.g. "reconstruction" or "ct", ``source`` a file path or node id the viewer loads."""

    case_id: str
    kind: str
    source: str


@dataclass(frozen=True)
class BlindedCase:
    """What the evaluator sees: a neutral label; ``source`` is for the loader, never displayed."""

    position: int
    label: str
    source: str


class LikertSession:
    """Use :meth:`open` (new or resumed); then ``current`` / ``record`` until ``done``."""

    def __init__(self, csv_path: Path, cases: list[Case], evaluator_id: str, question: str, seed: int,
                 rows: list[dict]):
        self.csv_path = Path(csv_path)
        self.cases = list(cases)
        self.evaluator_id = evaluator_id
        self.question = question
        self.seed = int(seed)
        self.order = [int(i) for i in np.random.default_rng(self.seed).permutation(len(self.cases))]
        self.rows = rows
        self._shown_at = time.monotonic()

    @staticmethod
    def session_path(csv_path: Path) -> Path:
        return Path(csv_path).with_suffix(".session.json")

    @classmethod
    def open(cls, csv_path: str | os.PathLike, cases: list[Case], evaluator_id: str,
             question: str = DEFAULT_QUESTION, seed: int | None = None) -> "LikertSession":
        """Start a session, or resume the one recorded at ``csv_path`` (same evaluator and cases)."""
        csv_path = Path(csv_path)
        evaluator_id = evaluator_id.strip()
        if not evaluator_id:
            raise ValueError("evaluator id is empty")
        if not cases:
            raise ValueError("no cases to score")
        if len({case.case_id for case in cases}) != len(cases):
            raise ValueError("case ids must be unique")
        meta_path = cls.session_path(csv_path)
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta["evaluator_id"] != evaluator_id:
                raise ValueError(f"{csv_path}: belongs to evaluator {meta['evaluator_id']!r}, not {evaluator_id!r}")
            if sorted(meta["case_ids"]) != sorted(case.case_id for case in cases):
                raise ValueError(f"{csv_path}: the recorded session has a different set of cases")
            by_id = {case.case_id: case for case in cases}
            cases = [by_id[case_id] for case_id in meta["case_ids"]]  # the recorded order makes the shuffle repeat
            rows = read_rows(csv_path) if csv_path.is_file() else []
            return cls(csv_path, cases, evaluator_id, meta["question"], meta["seed"], rows)
        if csv_path.exists():
            raise ValueError(f"{csv_path}: exists without its session file {meta_path.name}; choose a new file")
        from ixgs.volume import atomic_path  # imported here: the module (and its widget) load without torch

        seed = secrets.randbits(31) if seed is None else int(seed)
        session = cls(csv_path, cases, evaluator_id, question.strip() or DEFAULT_QUESTION, seed, [])
        with atomic_path(meta_path) as temporary:
            temporary.write_text(json.dumps({
                "evaluator_id": evaluator_id, "seed": seed, "question": session.question,
                "case_ids": [case.case_id for case in cases]}, indent=1))
        session._write_csv()
        return session

    @property
    def scored_positions(self) -> set[int]:
        return {int(row["position"]) for row in self.rows}

    @property
    def done(self) -> bool:
        return len(self.scored_positions) == len(self.cases)

    def current(self) -> BlindedCase | None:
        """The first unscored case, blinded; None when every case has a score."""
        for position, index in enumerate(self.order):
            if position not in self.scored_positions:
                return BlindedCase(position, blinded_label(position), self.cases[index].source)
        return None

    def mark_shown(self) -> None:
        """Restart the clock when the viewer finished displaying the current case."""
        self._shown_at = time.monotonic()

    def record(self, score: int, comment: str = "", time_spent_s: float | None = None) -> dict:
        """Score the current case (1..5) and append it to the CSV atomically."""
        if not (isinstance(score, (int, np.integer)) and 1 <= int(score) <= 5):
            raise ValueError(f"score must be an integer 1..5, got {score!r}")
        shown = self.current()
        if shown is None:
            raise ValueError("the session is complete; every case has a score")
        case = self.cases[self.order[shown.position]]
        spent = time.monotonic() - self._shown_at if time_spent_s is None else float(time_spent_s)
        row = {"evaluator_id": self.evaluator_id, "session_seed": self.seed, "position": shown.position,
               "blinded_label": shown.label, "case_id": case.case_id, "kind": case.kind, "source": case.source,
               "question": self.question, "score": int(score), "comment": comment.replace("\n", " ").strip(),
               "time_spent_s": round(spent, 3), "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.rows.append({key: str(value) for key, value in row.items()})
        try:
            self._write_csv()
        except Exception:
            self.rows.pop()
            raise
        self._shown_at = time.monotonic()
        return row

    def _write_csv(self) -> None:
        from ixgs.volume import atomic_path

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_path(self.csv_path) as temporary:
            temporary.write_text(buffer.getvalue(), newline="")

    def to_table_node(self, table_node=None):
        """The scores as a ``vtkMRMLTableNode`` (one text column per CSV column)."""
        import slicer

        if table_node is None:
            table_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "IXGS Likert scores")
        return rows_to_table(self.rows, COLUMNS, table_node)


def blinded_label(position: int) -> str:
    return f"Case {position + 1}"


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{csv_path}: not an IXGS Likert CSV (columns {reader.fieldnames})")
        return list(reader)


def rows_to_table(rows: list[dict], columns, table_node):
    """Fill a table node with string columns (replaces its content)."""
    table_node.RemoveAllColumns()
    for name in columns:
        table_node.AddColumn().SetName(name)
    for row in rows:
        index = table_node.AddEmptyRow()
        for column, name in enumerate(columns):
            table_node.SetCellText(index, column, str(row.get(name, "")))
    return table_node
