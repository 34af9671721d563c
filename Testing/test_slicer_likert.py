"""Blinded Likert session: recorded shuffle, blinding, atomic CSV, table node, resume."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="needs PyPI slicer-core (pip install slicer-core)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "IXGSReconstruction"))

from IXGSReconstructionLib.likert import COLUMNS, DEFAULT_QUESTION, Case, LikertSession  # noqa: E402

CASES = [Case(f"recon-{n}", "reconstruction", f"/data/recon-{n}.nrrd") for n in range(6)] + [
    Case("ct-0", "ct", "/data/ct-0.nrrd")]


def test_shuffle_is_recorded_and_blinded(tmp_path):
    session = LikertSession.open(tmp_path / "a.csv", CASES, "surgeon-1", seed=1234)
    again = LikertSession.open(tmp_path / "b.csv", CASES, "surgeon-1", seed=1234)
    other = LikertSession.open(tmp_path / "c.csv", CASES, "surgeon-1", seed=99)
    assert session.order == again.order != other.order
    assert sorted(session.order) == list(range(len(CASES)))
    assert session.question == DEFAULT_QUESTION
    shown = session.current()
    assert shown.label == "Case 1" and shown.position == 0
    assert shown.source == CASES[session.order[0]].source
    assert not any(case.case_id in shown.label for case in CASES)
    assert '"seed": 1234' in (tmp_path / "a.session.json").read_text()


def test_scores_go_to_csv_and_table_and_the_session_resumes(tmp_path):
    path = tmp_path / "scores.csv"
    session = LikertSession.open(path, CASES, "surgeon-1", question="Screw trajectory visible", seed=7)
    first = session.record(4, "clear pedicles", time_spent_s=12.5)
    second = session.record(2, "blurry\nbase", time_spent_s=3.0)
    with pytest.raises(ValueError, match="1..5"):
        session.record(6)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 2
    assert rows[0]["case_id"] == CASES[session.order[0]].case_id == first["case_id"]
    assert rows[1]["comment"] == "blurry base" and rows[1]["score"] == "2"
    assert rows[0]["question"] == "Screw trajectory visible" and rows[0]["session_seed"] == "7"
    assert float(rows[0]["time_spent_s"]) == 12.5
    assert not list(tmp_path.glob(".*partial*"))  # atomic writes leave no temporary files

    table = session.to_table_node(slicer.vtkMRMLTableNode())
    assert table.GetNumberOfRows() == 2 and table.GetNumberOfColumns() == len(COLUMNS)
    assert table.GetCellText(1, COLUMNS.index("score")) == "2"

    # Interrupted: a new session object on the same CSV continues with the third case, same order.
    resumed = LikertSession.open(path, list(reversed(CASES)), "surgeon-1", seed=12345)
    assert resumed.seed == 7 and resumed.order == session.order
    assert resumed.question == "Screw trajectory visible"
    assert resumed.current().position == 2 and resumed.current().label == "Case 3"
    while not resumed.done:
        resumed.record(3)
    assert resumed.current() is None
    with pytest.raises(ValueError, match="complete"):
        resumed.record(3)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["case_id"] for row in rows) == sorted(case.case_id for case in CASES)
    assert rows[1]["case_id"] == second["case_id"]  # earlier rows are kept, in order


def test_refusals(tmp_path):
    path = tmp_path / "scores.csv"
    LikertSession.open(path, CASES, "surgeon-1", seed=1)
    with pytest.raises(ValueError, match="surgeon-1"):
        LikertSession.open(path, CASES, "surgeon-2")
    with pytest.raises(ValueError, match="different set of cases"):
        LikertSession.open(path, CASES[:-1], "surgeon-1")
    with pytest.raises(ValueError, match="evaluator id"):
        LikertSession.open(tmp_path / "x.csv", CASES, "  ")
    with pytest.raises(ValueError, match="unique"):
        LikertSession.open(tmp_path / "y.csv", CASES + CASES[:1], "e")
    (tmp_path / "stray.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="session file"):
        LikertSession.open(tmp_path / "stray.csv", CASES, "e")
