"""``report.html``: one self-contained page per output folder (figures embedded as data: URIs, no
external file, script or network access), so it can be mailed, archived or opened anywhere.

It is written by :func:`ixgs.outputs.write_outputs` after a run, and rebuilt from a finished output
folder by :func:`rebuild_report` (``ixgs report OUT``).
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import shutil
from pathlib import Path

from .output_folder import MARKER
from .volume import Volume, atomic_path, read_json_object

REPORT_HTML = "report.html"
METRIC_NAMES = {"psnr": "3D PSNR (dB)", "ssim": "3D SSIM", "dice": "bone Dice",
                "bone_threshold": "bone threshold of the Dice (1/mm)"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1350px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px;
text-align: left; vertical-align: top; font-size: 0.92em; } th { background: #f3f3f3; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em; }
.note { color: #666; font-style: italic; } figure { margin: 1em 0; } img { max-width: 100%; }
figcaption { font-size: 0.95em; margin-bottom: 0.3em; font-weight: bold; }
"""


def _format(value) -> str:
    if isinstance(value, float):
        return "not available" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return "—" if value is None else str(value)


def _table(rows, header: tuple[str, ...] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_format(cell))}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}{body}</table>"


def _case_rows(report: dict, scan) -> list[tuple[str, object]]:
    settings = report.get("settings") or {}
    grid = report.get("grid") or {}
    rows = [("scan", report.get("scan")), ("views", (report.get("coverage") or {}).get("views"))]
    if scan is not None:
        shapes = sorted({view.shape for view in scan.views})
        rows.append(("detector (rows x cols px)", ", ".join(f"{r} x {c}" for r, c in shapes)))
        rows.append(("reference volume", scan.reference_volume))
    rows += [("grid (z, y, x voxels)", grid.get("shape")), ("voxel spacing (x, y, z mm)", grid.get("spacing_mm")),
             ("method / preset / init", " / ".join(str(settings.get(k)) for k in ("method", "preset", "init"))),
             ("device", report.get("device")), ("kernel", report.get("kernel", "not recorded")),
             ("wall time (s)", report.get("elapsed_s")), ("stop reason", report.get("stop_reason")),
             ("Gaussians", report.get("gaussians")), ("re-projection PSNR (dB, mean of shown views)",
                                                      report.get("reprojection_psnr")),
             ("peak memory (MiB)", report.get("peak_memory_mib")),
             ("bone threshold (1/mm)", report.get("bone_threshold")), ("ixgs version", report.get("ixgs_version"))]
    return rows


def _stage_rows(report: dict) -> list[tuple]:
    rows = [(stage.get("name"), stage.get("start_s"), stage.get("end_s"),
             (stage["end_s"] - stage["start_s"]) if {"start_s", "end_s"} <= set(stage) else None)
            for stage in report.get("stages") or []]
    rows.append(("whole reconstruction", 0.0, report.get("elapsed_s"), report.get("elapsed_s")))
    if "previews_s" in report:
        rows.append(("figures and report (after the reconstruction)", None, None, report["previews_s"]))
    return rows


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _file_rows(out_dir: Path) -> list[tuple[str, str]]:
    rows = []
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = path.relative_to(out_dir).as_posix()
        if name != REPORT_HTML:
            rows.append((name, f"{path.stat().st_size / 1024:.1f} KiB"))
    rows.append((REPORT_HTML, "this page"))
    rows.append((MARKER, "ixgs's record of the files above (written last: the folder is complete)"))
    return rows


def report_page(out_dir: str | os.PathLike, report: dict, notes: dict[str, str] | None = None, scan=None,
                location: str | os.PathLike | None = None) -> str:
    """The HTML text of the report for the output folder ``out_dir`` (figures read from its previews);
    ``location`` is where the folder will be, when it is written under a temporary name."""
    from .outputs import FIGURES, PREVIEWS

    out_dir = Path(out_dir)
    notes = notes or {}
    title = f"IXGS reconstruction: {Path(str(report.get('scan', out_dir.name))).name}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class=\"note\">Output folder {html.escape(str(Path(location or out_dir).resolve()))}; page written "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. World frame LPS, mm; "
             "attenuation in 1/mm.</p>", "<h2>Case</h2>", _table(_case_rows(report, scan))]
    coverage = report.get("coverage") or {}
    parts.append("<h2>Coverage</h2>")
    if "warning" in coverage:
        parts.append(f"<p class=\"warning\">{html.escape(coverage['warning'])}</p>")
    parts.append(_table([(k.replace("_", " "), v) for k, v in coverage.items() if k != "warning"]))
    parts.append("<h2>Metrics against the reference</h2>")
    if "metrics" in report:
        parts.append(_table([(METRIC_NAMES.get(k, k), v) for k, v in report["metrics"].items()], ("metric", "value")))
    else:
        parts.append("<p class=\"note\">The scan has no reference volume: no 3D metrics.</p>")
    parts += ["<h2>Wall time per stage</h2>", _table(_stage_rows(report), ("stage", "start s", "end s", "seconds"))]
    if not report.get("stages"):
        parts.append("<p class=\"note\">Per-stage times were not recorded in this report.json.</p>")
    parts.append("<h2>Figures</h2>")
    parts += [f"<p class=\"note\">{html.escape(text)}</p>" for key, text in notes.items() if key not in FIGURES]
    for name, caption in FIGURES.items():
        path = out_dir / PREVIEWS / name
        if name in notes:
            parts.append(f"<p class=\"note\">{html.escape(caption)}: not drawn — {html.escape(notes[name])}</p>")
        elif path.is_file():
            parts.append(f"<figure><figcaption>{html.escape(caption)}</figcaption>"
                         f"<img alt=\"{html.escape(caption)}\" src=\"{_data_uri(path)}\"></figure>")
    parts += ["<h2>Settings</h2>", _table(sorted((report.get("settings") or {}).items()), ("setting", "value"))]
    parts += ["<h2>Files</h2>", _table(_file_rows(out_dir), ("file", "size")), "</body></html>"]
    return "\n".join(parts)


def write_report_html(out_dir: str | os.PathLike, report: dict, notes: dict[str, str] | None = None,
                      scan=None, location: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir/report.html`` atomically (temporary file, then rename)."""
    path = Path(out_dir) / REPORT_HTML
    text = report_page(out_dir, report, notes, scan, location)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def rebuild_report(out_dir: str | os.PathLike) -> Path:
    """Redraw the figures and ``report.html`` of a finished output folder from its report.json,
    volume.nrrd (the bone surface is its level set at the recorded bone threshold, i.e. the boundary
    of bone.nrrd) and coverage.nrrd, and the scan named in report.json when it is still
    there (X-ray sources, reference slices). Re-projected views come only from the run: an existing
    ``previews/views.png`` is kept.

    The folder is rebuilt through :mod:`ixgs.output_folder` like any output (copied, redrawn, swapped
    in, its marker listing the new files): only an ixgs reconstruction output is accepted."""
    from .output_folder import check_output, output_folder
    from .outputs import KIND, OUTPUT_FILES, PREVIEWS, write_previews
    from .scan import ScanError, read_scan

    out_dir = Path(out_dir)
    if not (out_dir / "report.json").is_file():
        raise ValueError(f"{out_dir}: no report.json (not an IXGS output folder)")
    check_output(out_dir, KIND)  # our own reconstruction output, nothing foreign in it
    report = read_json_object(out_dir / "report.json", "no report.json (not an IXGS output folder)")
    volume = Volume.read(out_dir / "volume.nrrd")
    coverage = Volume.read(out_dir / "coverage.nrrd")
    scan, reference, notes = None, None, {}
    try:
        scan = read_scan(report.get("scan", ""))
        reference = Volume.read(scan.reference_volume) if scan.reference_volume is not None else None
    except (ScanError, OSError) as error:
        notes["scan"] = f"the scan could not be read ({error}): no X-ray sources or reference shown"
    with output_folder(out_dir, KIND) as temporary:
        for name in OUTPUT_FILES:
            shutil.copy2(out_dir / name, temporary / name)
        views = out_dir / PREVIEWS / "views.png"
        if views.is_file():
            (temporary / PREVIEWS).mkdir()
            shutil.copy2(views, temporary / PREVIEWS / views.name)
        notes.update(write_previews(temporary, volume, coverage, report, scan=scan, reference=reference))
        write_report_html(temporary, report, notes, scan, location=out_dir)
    return out_dir / REPORT_HTML
