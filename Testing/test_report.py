"""report.html: self-contained (only data: URIs), parses, lists every file; ``ixgs report`` rebuilds it;
``--no-previews`` skips figures and page."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import ring_of_matrices

from ixgs.output_folder import is_output
from ixgs.cli import main
from ixgs.geometry import Roi
from ixgs.outputs import FIGURES, PREVIEWS, write_outputs
from ixgs.report_html import REPORT_HTML
from ixgs.scan import read_scan, write_scan
from ixgs.volume import Volume


class _Page(HTMLParser):
    """Collects every src/href, the images and the text of a page."""

    def __init__(self):
        super().__init__()
        self.links, self.images, self.text, self.open = [], 0, [], []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]
        self.images += tag == "img"
        if tag not in ("meta", "img", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.open, page.open
    return page


def _volume() -> Volume:
    grid = Roi((0.0, 0.0, 0.0), (80.0, 80.0, 80.0)).grid(4.0)
    centers = grid.voxel_centers()
    values = 0.02 + 0.03 * (np.linalg.norm(centers - [5.0, 0.0, 0.0], axis=-1) < 15)
    return Volume.on_grid(values.astype(np.float32), grid)


@pytest.fixture
def scan_with_reference(tmp_path):
    images = [np.ones((32, 40), np.float32) + 0.2 * k for k in range(4)]
    reference = _volume()
    reference.array = reference.array * 1.1
    write_scan(tmp_path / "scan", images, ring_of_matrices(4), roi=Roi((0.0, 0.0, 0.0), (80.0, 80.0, 80.0)),
               reference=reference)
    return read_scan(tmp_path / "scan")


def _report(scan) -> dict:
    return {"scan": str(scan.path), "elapsed_s": 31.5, "stop_reason": "plateau", "device": "cpu",
            "kernel": "fused (torch.compile)", "settings": {"method": "gaussian", "preset": "fast"},
            "stages": [{"name": "warm start (SART)", "start_s": 0.0, "end_s": 2.0},
                       {"name": "Gaussians", "start_s": 2.0, "end_s": 31.0}],
            "densification": [{"iteration": 3, "elapsed_s": 12.0, "cloned": 5, "split": 3, "pruned": 2,
                               "total": 1006}]}


def _check_page(out):
    page = _parse(out / REPORT_HTML)
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)
    text = " ".join(page.text)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for name in files:
        assert name in text, name
    return page, text


def test_run_writes_self_contained_report(scan_with_reference, tmp_path):
    out = tmp_path / "out"
    scan = scan_with_reference
    reprojections = {0: scan.views[0].image * 1.02, 3: scan.views[3].image * 0.97}
    report = write_outputs(out, scan, _volume(), _report(scan), reprojections=reprojections,
                           loss_curve=[(0, 1.0), (1, 0.5), (2, 0.2), (3, 0.15), (4, 0.1)])
    assert sorted(p.name for p in (out / PREVIEWS).iterdir()) == sorted(FIGURES)
    page, text = _check_page(out)
    assert page.images == len(FIGURES)
    for expected in ("fused (torch.compile)", "warm start (SART)", "3D PSNR (dB)", "plateau", str(out.resolve())):
        assert expected in text, expected
    assert ".partial" not in text  # the page names the final folder, not the temporary one
    assert 0 < report["previews_s"] < 120
    assert json.loads((out / "report.json").read_text())["previews_s"] == pytest.approx(report["previews_s"])


def test_no_previews_writes_neither_figures_nor_page(scan_with_reference, tmp_path):
    out = tmp_path / "out"
    report = write_outputs(out, scan_with_reference, _volume(), _report(scan_with_reference), previews=False)
    assert sorted(p.name for p in out.iterdir()) == [".ixgs-output", "bone.nrrd", "coverage.nrrd", "report.json",
                                                    "volume.nrrd"]
    assert "previews_s" not in report


def test_report_command_rebuilds_from_folder(scan_with_reference, tmp_path, capsys):
    out = tmp_path / "out"
    write_outputs(out, scan_with_reference, _volume(), _report(scan_with_reference), previews=False,
                  loss_curve=[(0, 1.0), (1, 0.5), (2, 0.2)])
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / REPORT_HTML)
    drawn = sorted(p.name for p in (out / PREVIEWS).iterdir())
    assert drawn == sorted(set(FIGURES) - {"views.png"})  # re-projections exist only during a run
    page, text = _check_page(out)
    assert page.images == len(FIGURES) - 1 and "not stored" in text
    assert is_output(out)  # rebuilt through the output-folder policy: the marker lists the new files
    assert main(["report", str(out)]) == 0  # so it can be rebuilt (or replaced by a new run) again
    # The scan moved away: the page is still built, without sources or reference, and says why.
    shutil.rmtree(scan_with_reference.path)
    assert main(["report", str(out)]) == 0
    _, text = _check_page(out)
    assert "could not be read" in text


def test_report_command_refuses_a_folder_that_is_not_an_output(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no report.json" in err[0]
    assert not (tmp_path / REPORT_HTML).exists()
