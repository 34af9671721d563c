"""DICOM X-ray import: positioner tags -> projection matrices, image conventions, refusals."""
from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from ixgs.dicom import import_dicom, read_dicom_views  # noqa: E402
from ixgs.geometry import project_points  # noqa: E402
from ixgs.phantom import default_roi, hu_to_attenuation, make_phantom  # noqa: E402
from ixgs.projector import project_volume  # noqa: E402
from ixgs.reconstruct import ReconstructionSettings, reconstruct  # noqa: E402
from ixgs.scan import read_scan, write_scan  # noqa: E402
from ixgs.simulate import c_arm_projection_matrix, fitting_pixel_spacing, random_c_arm_poses  # noqa: E402
from ixgs.volume import Volume  # noqa: E402

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
SLOPE = 2e-4  # line integral per stored unit


def write_xray(path, frames: np.ndarray, **tags) -> None:
    """A minimal XA file: uint16 frames (n, rows, cols) or (rows, cols), LOG intensities, the given tags."""
    frames = np.asarray(frames)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XA_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = XA_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    ds.SeriesInstanceUID = "1.2.3"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, 0
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", -1
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = frames.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def quantize(image: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(image, float) / SLOPE).astype(np.uint16)


def pose_tags(pose, spacing) -> dict:
    return {"PositionerPrimaryAngle": pose.primary_deg, "PositionerSecondaryAngle": pose.secondary_deg,
            "DistanceSourceToDetector": pose.source_to_detector_mm,
            "DistanceSourceToPatient": pose.source_to_isocenter_mm, "ImagerPixelSpacing": [spacing, spacing]}


def relative_difference(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a / np.linalg.norm(a) - b / np.linalg.norm(b)).max())


def test_imported_knee_scan_has_the_same_matrices_and_reconstruction(tmp_path):
    """Knee phantom views (isocentre at the origin) written as XA files come back exactly."""
    roi = default_roi("knee")
    phantom = make_phantom("knee", seed=1, voxel_size_mm=4.0)
    attenuation = Volume(hu_to_attenuation(phantom.array).astype(np.float32), phantom.origin, phantom.spacing)
    poses = random_c_arm_poses(6, np.random.default_rng(1))
    spacing = fitting_pixel_spacing(poses, roi, 48)
    matrices = [pose.projection_matrix((48, 48), (spacing, spacing), roi.center) for pose in poses]
    quantized = [quantize(project_volume(attenuation, P, (48, 48))) for P in matrices]
    for index, (pose, image) in enumerate(zip(poses, quantized)):
        write_xray(tmp_path / "dicom" / f"{index:02d}.dcm", image, InstanceNumber=index + 1, **pose_tags(pose, spacing))
    (tmp_path / "dicom" / "README.txt").write_text("not DICOM")  # skipped

    original = read_scan(write_scan(tmp_path / "original", [q * SLOPE for q in quantized],
                                    matrices, roi=roi))
    imported = read_scan(import_dicom(tmp_path / "dicom", tmp_path / "imported"))
    assert len(imported.views) == 6
    for ours, theirs in zip(imported.views, original.views):
        assert relative_difference(ours.projection_matrix, theirs.projection_matrix) < 1e-6
        assert np.array_equal(ours.image, theirs.image)

    settings = ReconstructionSettings(method="sart", iterations=2, voxel_size_mm=4.0, roi=roi, device="cpu")
    a = reconstruct(original, settings).volume.array
    b = reconstruct(imported, settings).volume.array
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    assert np.abs(a).max() > 0.005  # a real reconstruction, not zeros


def test_rotational_run_uses_angle_increments_per_frame(tmp_path):
    frames = np.zeros((3, 20, 24), np.uint16)
    write_xray(tmp_path / "run.dcm", frames, PositionerPrimaryAngle=-30.0, PositionerSecondaryAngle=10.0,
               PositionerPrimaryAngleIncrement=[0.0, 25.0, 25.0], PositionerSecondaryAngleIncrement=[0.0, -5.0, -5.0],
               PositionerMotion="DYNAMIC", DistanceSourceToDetector=1100.0, DistanceSourceToPatient=750.0,
               ImagerPixelSpacing=[0.4, 0.3])
    views = read_dicom_views(tmp_path)
    assert [view.name for view in views] == ["run.dcm#0", "run.dcm#1", "run.dcm#2"]
    for view, (primary, secondary) in zip(views, [(-30, 10), (-5, 5), (20, 0)]):
        expected = c_arm_projection_matrix(primary, secondary, 1100.0, 750.0, (20, 24), (0.4, 0.3))
        assert relative_difference(view.projection_matrix, expected) < 1e-9


def test_patient_orientation_and_detector_offsets(tmp_path):
    tags = {"PositionerPrimaryAngle": 0.0, "PositionerSecondaryAngle": 0.0, "DistanceSourceToDetector": 1000.0,
            "DistanceSourceToPatient": 700.0, "ImagerPixelSpacing": [0.5, 0.5]}
    head, left = np.array([0.0, 0.0, 10.0]), np.array([10.0, 0.0, 0.0])

    def axes_of(**extra):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        write_xray(folder / "a.dcm", np.zeros((30, 40), np.uint16), **{**tags, **extra})
        P = read_dicom_views(folder)[0].projection_matrix
        center = project_points(P, np.zeros(3))[:2]
        return center, project_points(P, head)[:2] - center, project_points(P, left)[:2] - center

    center, up, right = axes_of(PatientOrientation=["L", "F"])  # the default AP orientation
    assert center == pytest.approx([19.5, 14.5]) and up[1] < 0 and right[0] > 0
    _, up, right = axes_of(PatientOrientation=["R", "F"])  # seen from the source: mirrored columns
    assert up[1] < 0 and right[0] < 0
    _, up, right = axes_of(PatientOrientation=["F", "L"])  # transposed storage
    assert up[0] < 0 and right[1] > 0
    _, up, right = axes_of(FieldOfViewRotation=180.0, FieldOfViewHorizontalFlip="NO")
    assert up[1] > 0 and right[0] < 0
    with pytest.raises(ValueError, match="PatientOrientation.*contradicts"):
        axes_of(PatientOrientation=["A", "F"])
    with pytest.raises(ValueError, match="contradicts FieldOfViewRotation"):
        axes_of(PatientOrientation=["L", "F"], FieldOfViewHorizontalFlip="YES")
    # Active area 40 x 50 mm at the physical corner, image (15 x 20 mm) starting 10 elements (5 mm) down
    # and right: the central ray hits the active centre (20, 25) mm = (15, 20) mm into the image,
    # i.e. pixel row 29.5, column 39.5.
    center, _, _ = axes_of(DetectorActiveOrigin=[0.0, 0.0], DetectorActiveDimensions=[40.0, 50.0],
                           FieldOfViewOrigin=[10.0, 10.0], DetectorElementSpacing=[0.5, 0.5])
    assert center == pytest.approx([39.5, 29.5])


def test_missing_and_contradictory_tags_are_refused_by_name(tmp_path):
    tags = {"PositionerPrimaryAngle": 20.0, "PositionerSecondaryAngle": 0.0, "DistanceSourceToPatient": 700.0,
            "ImagerPixelSpacing": [0.5, 0.5]}
    write_xray(tmp_path / "a.dcm", np.zeros((8, 8), np.uint16), **tags)
    with pytest.raises(ValueError, match=r"a\.dcm: missing DistanceSourceToDetector \(0018,1110\); give --assume-sid"):
        read_dicom_views(tmp_path)
    view = read_dicom_views(tmp_path, assume_sid_mm=1100.0)[0]
    expected = c_arm_projection_matrix(20.0, 0.0, 1100.0, 700.0, (8, 8), (0.5, 0.5))
    assert relative_difference(view.projection_matrix, expected) < 1e-9
    with pytest.raises(ValueError, match="ImagerPixelSpacing.*--assume-pixel-spacing says 0.4"):
        read_dicom_views(tmp_path, assume_sid_mm=1100.0, assume_pixel_spacing_mm=0.4)
    with pytest.raises(ValueError, match="must be positive and below DistanceSourceToDetector"):
        read_dicom_views(tmp_path, assume_sid_mm=600.0)
    write_xray(tmp_path / "b.dcm", np.zeros((2, 8, 8), np.uint16), **tags, DistanceSourceToDetector=1000.0,
               PositionerPrimaryAngleIncrement=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"b\.dcm: PositionerPrimaryAngleIncrement must have 2 value"):
        read_dicom_views(tmp_path, assume_sid_mm=1000.0)
    (tmp_path / "b.dcm").unlink()
    write_xray(tmp_path / "c.dcm", np.zeros((8, 8), np.uint16), **tags, DistanceSourceToDetector=1000.0,
               Modality="CT")
    with pytest.raises(ValueError, match=r"c\.dcm: Modality \(0008,0060\) is 'CT'"):
        read_dicom_views(tmp_path, assume_sid_mm=1000.0)


def test_linear_transmission_pixels_become_line_integrals(tmp_path):
    truth = np.linspace(0.0, 3.0, 64).reshape(8, 8)
    counts = np.round(4000.0 * np.exp(-truth)).astype(np.uint16)
    write_xray(tmp_path / "t.dcm", counts, PositionerPrimaryAngle=0.0, PositionerSecondaryAngle=0.0,
               DistanceSourceToDetector=1000.0, DistanceSourceToPatient=700.0, ImagerPixelSpacing=[0.5, 0.5],
               PixelIntensityRelationship="LIN", PixelIntensityRelationshipSign=1, RescaleSlope=1.0)
    image = read_dicom_views(tmp_path)[0].image
    assert np.abs(image - truth).max() < 0.02  # rounding of counts near 4000 exp(-3) ~ 200
