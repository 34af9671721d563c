"""Import DICOM X-ray images (XA, RF, DX, CR) with their C-arm geometry as a scan.

Each frame becomes a view whose projection matrix is built from the positioner tags with
:func:`ixgs.simulate.c_arm_projection_matrix` (DICOM angles, see ``docs/geometry.md``):

* angles: Positioner Primary / Secondary Angle (0018,1510/1511), per frame from the Enhanced
  XA per-frame functional groups (Positioner Position Sequence), or, for a legacy rotational
  run, the first frame's angle plus the running sum of the Angle Increments (0018,1520/1521);
* distances: Distance Source to Detector (0018,1110) and Distance Source to Patient (0018,1111),
  taken as the source-isocentre distance (Enhanced XA: X-Ray Geometry Sequence's Distance Source
  to Isocenter); the world origin is the isocentre (table motion is not modelled);
* pixel size at the detector: Imager Pixel Spacing (0018,1164), else Detector Element Spacing
  (0018,7022) times Detector Binning (0018,701A);
* principal point: the centre of the active detector area (Detector Active Origin and
  Dimensions, 0018,7028/7026) located in the image through Field of View Origin (0018,7030);
  the image centre when these are not all given;
* image orientation: the default is the one of ``c_arm_projection_matrix`` (seen from the
  detector, AP view with the head up and the patient's left on the right); Field of View Rotation
  / Horizontal Flip (0018,7032/7034) and Patient Orientation (0020,0020) change it, and must agree;
* intensities: the Modality LUT (Rescale Slope / Intercept), then Pixel Intensity Relationship
  (0028,1040) and its Sign (0028,1041), else Photometric Interpretation, say how a pixel relates
  to the X-ray intensity (see :func:`attenuation_image`).

Missing or contradictory tags raise ``ValueError`` naming the file and the tag.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geometry import normalize_projection_matrix
from .scan import transmission_to_attenuation, write_scan
from .simulate import c_arm_projection_matrix

MODALITIES = ("XA", "RF", "DX", "CR")
# World direction (LPS) of each Patient Orientation letter.
ORIENTATION_LETTERS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0),
                       "H": (0, 0, 1), "F": (0, 0, -1)}
# |cosine| below which a Patient Orientation letter does not match an image axis of the pose.
ORIENTATION_MIN_COSINE = 0.5
ISOCENTER = (0.0, 0.0, 0.0)
# Files with these suffixes, or with the DICOM preamble ("DICM" at byte 128), are DICOM: one that cannot
# be read is refused rather than skipped (a truncated copy must not silently drop a view).
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class DicomView:
    """One imported frame: attenuation line integrals, its LPS projection matrix, and where it came from."""

    image: np.ndarray
    projection_matrix: np.ndarray
    name: str  # "file.dcm" or "file.dcm#frame"


def import_dicom(folder: str | os.PathLike, out_scan: str | os.PathLike, *, assume_sid_mm: float | None = None,
                 assume_sod_mm: float | None = None,
                 assume_pixel_spacing_mm: float | None = None) -> Path:
    """Read every DICOM X-ray under ``folder`` and write them as a scan (what ``ixgs import-dicom`` runs)."""
    views = read_dicom_views(folder, assume_sid_mm=assume_sid_mm, assume_sod_mm=assume_sod_mm,
                             assume_pixel_spacing_mm=assume_pixel_spacing_mm)
    if len(views) < 2:
        raise ValueError(f"{folder}: a scan needs at least 2 views, found {len(views)} DICOM frame(s)")
    return write_scan(out_scan, [view.image for view in views], [view.projection_matrix for view in views],
                      inputs=[folder])


def read_dicom_views(folder: str | os.PathLike, *, assume_sid_mm: float | None = None,
                     assume_sod_mm: float | None = None,
                     assume_pixel_spacing_mm: float | None = None) -> list[DicomView]:
    """All frames of the DICOM X-ray files under ``folder`` (recursively), ordered by series and instance.

    The ``assume_*`` values stand in for a missing distance (mm) or imager pixel spacing (mm, square);
    a file whose tag disagrees with an assumption given is refused.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise ValueError("DICOM import needs pydicom: pip install 'ixgs[dicom]'") from None

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    datasets = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        label = path.relative_to(folder).as_posix()
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            if _looks_like_dicom(path):
                raise ValueError(f"{label}: a DICOM file that cannot be read (truncated or damaged?): "
                                 f"{str(error).strip() or type(error).__name__}") from None
            continue  # not DICOM (a README, a thumbnail): skipped
        if "PixelData" not in ds:
            if _is_image(ds):
                raise ValueError(f"{label}: an image without PixelData (7FE0,0010): truncated or damaged?")
            continue  # DICOMDIR, structured reports
        datasets.append((str(ds.get("SeriesInstanceUID", "")), _number(ds.get("InstanceNumber")) or 0.0, path, ds))
    if not datasets:
        raise ValueError(f"{folder}: no DICOM image found")
    assumptions = {"DistanceSourceToDetector": assume_sid_mm, "DistanceSourceToPatient": assume_sod_mm,
                   "ImagerPixelSpacing": assume_pixel_spacing_mm}
    views = []
    for _, _, path, ds in sorted(datasets, key=lambda item: item[:3]):
        views.extend(dataset_views(ds, path.relative_to(folder).as_posix(), assumptions))
    return views


def _is_image(ds) -> bool:
    """Whether a dataset is an X-ray or any other image object by its Modality or SOP Class."""
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return str(ds.get("Modality", "")) in MODALITIES or "Image Storage" in str(getattr(sop_class, "name", ""))


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        preamble = handle.read(132)
    return path.suffix.lower() in DICOM_SUFFIXES or preamble[128:132] == b"DICM"


def dataset_views(ds, label: str, assumptions: dict | None = None) -> list[DicomView]:
    """The views (one per frame) of one pydicom dataset; ``label`` names it in errors."""
    assumptions = assumptions or {}
    modality = str(ds.get("Modality", ""))
    if modality not in MODALITIES:
        raise ValueError(f"{label}: Modality (0008,0060) is {modality!r}; only {', '.join(MODALITIES)} are X-ray images")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{label}: SamplesPerPixel (0028,0002) must be 1 (greyscale)")
    try:
        pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as error:  # pydicom raises many types for unsupported or broken pixel data
        raise ValueError(f"{label}: PixelData cannot be decoded ({error})") from None
    n_frames = int(_number(ds.get("NumberOfFrames")) or 1)
    frames = pixels.reshape((n_frames,) + pixels.shape[-2:])
    shape = frames.shape[1:]
    spacing = _pixel_spacing(ds, label, assumptions.get("ImagerPixelSpacing"))
    sid, sod = _distances(ds, label, assumptions)
    primary, secondary = _frame_angles(ds, n_frames, label)
    image_axes = _image_axes_transform(ds, label)
    views = []
    for frame in range(n_frames):
        name = label if n_frames == 1 else f"{label}#{frame}"
        matrix = dicom_projection_matrix(primary[frame], secondary[frame], sid[frame], sod[frame], shape, spacing,
                                         image_axes, ds, name)
        image = attenuation_image(ds, frames[frame], name)
        if not np.all(np.isfinite(image)):
            raise ValueError(f"{name}: pixel values are not finite after RescaleSlope / RescaleIntercept "
                             "(0028,1053/1052)")
        views.append(DicomView(image, matrix, name))
    return views


def dicom_projection_matrix(primary_deg: float, secondary_deg: float, sid_mm: float, sod_mm: float,
                            shape: tuple[int, int], spacing_mm: tuple[float, float], image_axes: np.ndarray | None,
                            ds=None, label: str = "view") -> np.ndarray:
    """The LPS projection matrix of a stored image (rows, cols) whose axes relate to the default
    C-arm image axes by the signed permutation ``image_axes`` (2x2, default -> stored, centred pixels).

    ``image_axes`` None means: take it from Patient Orientation (0020,0020) of ``ds``, else identity.
    """
    if not 0 < sod_mm < sid_mm:
        raise ValueError(f"{label}: DistanceSourceToPatient ({sod_mm} mm) must be positive and below "
                         f"DistanceSourceToDetector ({sid_mm} mm)")
    if ds is not None and "PatientOrientation" in ds and len(ds.PatientOrientation) == 2:
        # The image axes of a pose do not depend on the detector's size, so any shape finds them.
        probe = c_arm_projection_matrix(primary_deg, secondary_deg, sid_mm, sod_mm, shape, spacing_mm, ISOCENTER)
        from_orientation = _orientation_transform(probe, ds.PatientOrientation, label)
        if image_axes is not None and not np.array_equal(image_axes, from_orientation):
            raise ValueError(f"{label}: PatientOrientation (0020,0020) {list(ds.PatientOrientation)} contradicts "
                             "FieldOfViewRotation / FieldOfViewHorizontalFlip (0018,7032/7034)")
        image_axes = from_orientation
    stored_rows, stored_cols = shape
    transposed = image_axes is not None and image_axes[0, 0] == 0
    default_shape = (stored_cols, stored_rows) if transposed else (stored_rows, stored_cols)
    default_spacing = tuple(spacing_mm[::-1]) if transposed else tuple(spacing_mm)
    offset = _detector_offset_px(ds, default_shape, default_spacing, label) if ds is not None else (0.0, 0.0)
    default = c_arm_projection_matrix(primary_deg, secondary_deg, sid_mm, sod_mm, default_shape, default_spacing,
                                      ISOCENTER, offset)
    if image_axes is None:
        return default
    return normalize_projection_matrix(pixel_axes_matrix(image_axes, default_shape) @ default, np.asarray(ISOCENTER))


def pixel_axes_matrix(image_axes: np.ndarray, default_shape: tuple[int, int]) -> np.ndarray:
    """3x3 pixel transform (u, v, 1) default -> stored for a signed permutation of centred axes."""
    rows, cols = default_shape
    center = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0])
    stored_size = np.abs(image_axes) @ np.array([cols, rows], float)
    stored_center = (stored_size - 1) / 2.0
    transform = np.eye(3)
    transform[:2, :2] = image_axes
    transform[:2, 2] = stored_center - image_axes @ center
    return transform


def image_axis_directions(projection_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit world directions (LPS) in which the column index u and the row index v increase."""
    M = np.asarray(projection_matrix, float)[:, :3]
    along_u = np.cross(M[1], M[2])
    along_v = np.cross(M[0], M[2])
    along_u *= np.sign(M[0] @ along_u)
    along_v *= np.sign(M[1] @ along_v)
    return along_u / np.linalg.norm(along_u), along_v / np.linalg.norm(along_v)


def attenuation_image(ds, pixels: np.ndarray, label: str = "view") -> np.ndarray:
    """Line integrals (float32) from stored pixels.

    After the Modality LUT: ``LIN`` with sign +1 (pixel grows with X-ray intensity) is a transmission
    image, converted with -log(I / I0) (I0 from the brightest pixels); ``LOG`` is taken as the line
    integral itself (sign -1) or its negative (sign +1), so its rescale must make it one; ``DISP`` or
    no relationship: a display image, with dense = bright (MONOCHROME2) or dark (MONOCHROME1), shifted
    so its minimum is 0 (an approximation: the detector's gain is unknown).
    """
    values = pixels * float(_number(ds.get("RescaleSlope")) or 1.0) + float(_number(ds.get("RescaleIntercept")) or 0.0)
    relationship = str(ds.get("PixelIntensityRelationship", "")).upper()
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{label}: PhotometricInterpretation (0028,0004) {photometric!r} is not a greyscale X-ray")
    sign = ds.get("PixelIntensityRelationshipSign")
    if sign is None:  # MONOCHROME1 shows low values white: dense (low intensity) is low
        sign = 1 if photometric == "MONOCHROME1" else -1
    if int(sign) not in (1, -1):
        raise ValueError(f"{label}: PixelIntensityRelationshipSign (0028,1041) must be +1 or -1, got {sign}")
    if relationship == "LIN":
        if int(sign) != 1:
            raise ValueError(f"{label}: PixelIntensityRelationship LIN with sign -1 (inverted linear intensity) "
                             "is not supported")
        return transmission_to_attenuation(values.astype(np.float32), None, label)
    if relationship == "LOG":
        return (-int(sign) * values).astype(np.float32)
    dense_high = -int(sign) * values
    return (dense_high - dense_high.min()).astype(np.float32)


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def _finite_tag(value: float | None, label: str, keyword: str, tag: str) -> float | None:
    """``value`` of a geometry tag, refused when NaN or infinite (it would make the matrix NaN)."""
    if value is not None and not np.isfinite(value):
        raise ValueError(f"{label}: {keyword} {tag} is {value}, not a finite number")
    return value


def _tag_values(ds, keyword: str, count: int, label: str) -> np.ndarray | None:
    """A numeric tag with ``count`` values (None when absent); refuses a wrong count or non-finite values."""
    if keyword not in ds or ds.get(keyword) in (None, ""):
        return None
    values = np.atleast_1d(np.asarray(ds.get(keyword), dtype=float))
    if values.size != count:
        raise ValueError(f"{label}: {keyword} must have {count} value(s), got {values.size}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{label}: {keyword} has non-finite values {values.tolist()}")
    return values


def _pixel_spacing(ds, label: str, assumed: float | None) -> tuple[float, float]:
    """(row, column) spacing in mm at the detector."""
    spacing = _tag_values(ds, "ImagerPixelSpacing", 2, label)
    source = "ImagerPixelSpacing (0018,1164)"
    if spacing is None:
        element = _tag_values(ds, "DetectorElementSpacing", 2, label)
        if element is not None:
            binning = _tag_values(ds, "DetectorBinning", 2, label)
            spacing = element * (binning if binning is not None else 1.0)
            source = "DetectorElementSpacing (0018,7022)"
    if spacing is None:
        if assumed is None:
            raise ValueError(f"{label}: missing ImagerPixelSpacing (0018,1164) and DetectorElementSpacing "
                             "(0018,7022); give --assume-pixel-spacing")
        spacing = np.array([assumed, assumed], float)
    elif assumed is not None and not np.allclose(spacing, assumed, rtol=1e-6):
        raise ValueError(f"{label}: {source} is {spacing.tolist()} mm but --assume-pixel-spacing says {assumed} mm")
    if np.any(spacing <= 0):
        raise ValueError(f"{label}: {source} must be positive, got {spacing.tolist()}")
    return float(spacing[0]), float(spacing[1])


def _functional_group_value(ds, frame: int, sequence: str, keyword: str):
    """A value from the Enhanced per-frame functional group of ``frame``, else the shared group, else None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is None or len(items) <= index:
            continue
        inner = items[index].get(sequence)
        if inner is not None and len(inner) and keyword in inner[0]:
            return float(inner[0].get(keyword))
    return None


def _distances(ds, label: str, assumptions: dict) -> tuple[list[float], list[float]]:
    """Per-frame source-detector and source-isocentre distances (mm)."""
    n_frames = int(_number(ds.get("NumberOfFrames")) or 1)
    result = []
    for keyword, enhanced, tag, option in (
            ("DistanceSourceToDetector", "DistanceSourceToDetector", "(0018,1110)", "--assume-sid"),
            ("DistanceSourceToPatient", "DistanceSourceToIsocenter", "(0018,1111)", "--assume-sod")):
        assumed = assumptions.get(keyword)
        values = []
        for frame in range(n_frames):
            value = _functional_group_value(ds, frame, "XRayGeometrySequence", enhanced)
            if value is None:
                value = _number(ds.get(keyword))
            _finite_tag(value, label, keyword, tag)
            if value is None:
                if assumed is None:
                    raise ValueError(f"{label}: missing {keyword} {tag}; give {option} MM")
                value = float(assumed)
            elif assumed is not None and not np.isclose(value, assumed, rtol=1e-6):
                raise ValueError(f"{label}: {keyword} {tag} is {value} mm but {option} says {assumed} mm")
            values.append(value)
        result.append(values)
    return result[0], result[1]


def _frame_angles(ds, n_frames: int, label: str) -> tuple[list[float], list[float]]:
    """Per-frame primary and secondary angles (degrees)."""
    angles = []
    for keyword, tag in (("PositionerPrimaryAngle", "(0018,1510)"), ("PositionerSecondaryAngle", "(0018,1511)")):
        per_frame = [_finite_tag(_functional_group_value(ds, f, "PositionerPositionSequence", keyword), label,
                                 keyword, tag) for f in range(n_frames)]
        if all(value is not None for value in per_frame):
            angles.append(per_frame)
            continue
        first = _finite_tag(_number(ds.get(keyword)), label, keyword, tag)
        if first is None:
            raise ValueError(f"{label}: missing {keyword} {tag}")
        increments = _tag_values(ds, f"{keyword}Increment", n_frames, label) if n_frames > 1 else None
        if n_frames > 1 and increments is None and str(ds.get("PositionerMotion", "STATIC")).upper() == "DYNAMIC":
            raise ValueError(f"{label}: PositionerMotion is DYNAMIC but {keyword}Increment is missing")
        offsets = np.cumsum(increments) if increments is not None else np.zeros(n_frames)
        angles.append([first + float(offset) for offset in offsets])
    return angles[0], angles[1]


def _image_axes_transform(ds, label: str) -> np.ndarray | None:
    """Signed permutation (default -> stored image axes) from Field of View Rotation and Horizontal Flip."""
    rotation = _number(ds.get("FieldOfViewRotation"))
    flip = str(ds.get("FieldOfViewHorizontalFlip", "")).upper()
    if rotation is None and flip == "":
        return None
    rotation = rotation or 0.0
    if rotation % 90 != 0:
        raise ValueError(f"{label}: FieldOfViewRotation (0018,7032) must be 0, 90, 180 or 270, got {rotation}")
    quarter = np.array([[0, -1], [1, 0]])  # one clockwise quarter turn as displayed (rows point down)
    transform = np.linalg.matrix_power(quarter, int(rotation // 90) % 4)
    if flip == "YES":
        transform = np.diag([-1, 1]) @ transform
    elif flip not in ("", "NO"):
        raise ValueError(f"{label}: FieldOfViewHorizontalFlip (0018,7034) must be YES or NO, got {flip!r}")
    return transform


def _orientation_transform(default_matrix: np.ndarray, orientation, label: str) -> np.ndarray:
    """Signed permutation (default -> stored axes) that makes the image agree with Patient Orientation."""
    axes = image_axis_directions(default_matrix)
    transform = np.zeros((2, 2), dtype=int)
    for stored_axis, text in enumerate(orientation):
        text = str(text).upper()
        if not text or any(letter not in ORIENTATION_LETTERS for letter in text):
            raise ValueError(f"{label}: PatientOrientation (0020,0020) value {text!r} is not made of L R A P H F")
        direction = np.sum([ORIENTATION_LETTERS[letter] for letter in text], axis=0).astype(float)
        direction /= np.linalg.norm(direction)
        cosines = np.array([axes[0] @ direction, axes[1] @ direction])
        best = int(np.argmax(np.abs(cosines)))
        if abs(cosines[best]) < ORIENTATION_MIN_COSINE:
            raise ValueError(f"{label}: PatientOrientation (0020,0020) {list(orientation)} contradicts the "
                             "positioner angles (no image axis of the pose points that way)")
        transform[stored_axis, best] = int(np.sign(cosines[best]))
    if abs(round(np.linalg.det(transform))) != 1:
        raise ValueError(f"{label}: PatientOrientation (0020,0020) {list(orientation)} names the same image axis twice")
    return transform


def _detector_offset_px(ds, default_shape, default_spacing, label: str) -> tuple[float, float]:
    """Where the central ray (the active area's centre) hits, relative to the image centre, in default
    pixels (rows, cols); zero unless Detector Active Origin and Dimensions and Field of View Origin are given."""
    active_origin = _tag_values(ds, "DetectorActiveOrigin", 2, label)
    field_origin = _tag_values(ds, "FieldOfViewOrigin", 2, label)
    if active_origin is None or field_origin is None or "DetectorActiveDimensions" not in ds:
        return 0.0, 0.0
    dimensions = np.atleast_1d(np.asarray(ds.DetectorActiveDimensions, dtype=float))
    dimensions = np.repeat(dimensions, 2) if dimensions.size == 1 else dimensions  # ROUND: one diameter
    element = _tag_values(ds, "DetectorElementSpacing", 2, label)
    element = np.asarray(default_spacing) if element is None else element
    active_center = active_origin + 0.5 * dimensions
    field_center = field_origin * element + 0.5 * np.asarray(default_shape) * np.asarray(default_spacing)
    offset = (active_center - field_center) / np.asarray(default_spacing)
    return float(offset[0]), float(offset[1])
