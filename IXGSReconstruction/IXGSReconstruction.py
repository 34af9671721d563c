"""IXGSReconstruction: 3D from a few arbitrarily posed X-rays, reviewed in Slicer.

The widget only binds the .ui to a parameter node and calls logic; the logic lives in
``IXGSReconstructionLib`` (Qt-free, tested headless with slicer-core).
"""
import logging
import os
import pathlib
import sys
from typing import Annotated

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

from IXGSReconstructionLib.likert import DEFAULT_QUESTION, SCALE
from IXGSReconstructionLib.options import KERNELS

SAMPLE_CATEGORY = "IXGS"


#
# IXGSReconstruction
#


class IXGSReconstruction(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("IXGS Reconstruction")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "IXGS")]
        self.parent.dependencies = []
        self.parent.contributors = ["IXGS project"]
        self.parent.helpText = _("""
Reconstruct a 3D attenuation volume (1/mm) from 10-30 X-rays taken at arbitrary C-arm poses with
radiative 3D Gaussians, then review it: bone segmentation and rendering, coverage map, X-ray poses,
align to anatomy, comparison with a CT, and blinded Likert scoring.
Documentation: docs/slicer.md in the IXGS source tree.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer's scripted module template; background processing follows SlicerMONAIAuto3DSeg.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: generated on this computer (no download)
#


def registerSampleData():
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources/Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataCategory(SAMPLE_CATEGORY, title=_("IXGS"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName="IXGSSpinePhantomScan",
        thumbnailFileName=os.path.join(iconsPath, "IXGSReconstruction.png"),
        customDownloader=_generateSampleScan,
    )


def _generateSampleScan(source=None):
    """Simulate the sample scan locally (about a minute the first time), load its reference CT and
    point the module at it."""
    IXGSReconstructionLogic.ensureDependencies()
    from IXGSReconstructionLib.sampledata import generate_sample_scan

    folder = pathlib.Path(slicer.app.cachePath) / "IXGS" / "spine-phantom-scan"
    with slicer.util.WaitCursor():
        slicer.util.showStatusMessage(_("Simulating the IXGS sample scan..."))
        scan = generate_sample_scan(folder)
    reference = slicer.util.loadVolume(str(scan / "reference.nrrd"), {"name": "IXGS phantom reference"})
    parameterNode = IXGSReconstructionLogic().getParameterNode()
    parameterNode.scanPath = scan
    parameterNode.referenceVolume = reference
    slicer.util.showStatusMessage(_("Sample scan ready: {path}").format(path=scan), 5000)
    return [reference]


#
# Parameter node
#


@parameterNodeWrapper
class IXGSReconstructionParameterNode:
    scanPath: pathlib.Path
    roi: vtkMRMLMarkupsROINode
    voxelSizeMm: Annotated[float, WithinRange(0.0, 20.0)] = 0.0  # 0: the engine's default
    preset: Annotated[str, Choice(["fast", "standard", "high"])] = "standard"
    method: Annotated[str, Choice(["gaussian", "sart"])] = "gaussian"
    init: Annotated[str, Choice(["random", "sart"])] = "sart"  # the engine's default
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    refinePoses: bool = False
    timeBudgetS: Annotated[float, WithinRange(0.0, 86400.0)] = 0.0  # 0: no budget, the engine's default
    kernel: Annotated[str, Choice(list(KERNELS))] = "auto"
    outputDirectory: pathlib.Path
    outputVolume: vtkMRMLScalarVolumeNode
    coverageVolume: vtkMRMLScalarVolumeNode
    boneSegmentation: vtkMRMLSegmentationNode
    boneThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    landmarks: vtkMRMLMarkupsFiducialNode
    referenceVolume: vtkMRMLScalarVolumeNode
    registerReference: bool = True
    metricsTable: vtkMRMLTableNode
    likertEvaluator: str = ""
    likertQuestion: str = DEFAULT_QUESTION
    likertCsvPath: pathlib.Path


#
# Widget
#


class IXGSReconstructionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 300

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._finishedRun = None  # its folder holds the last outputs (report.html) until the next run
        self._outputFolder = None
        self._likert = None
        self._likertNode = None

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IXGSReconstruction.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IXGSReconstructionLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(250)
        self._thresholdTimer.connect("timeout()", self.onThresholdChanged)
        self._scoreButtons = qt.QButtonGroup(uiWidget)
        for score in SCALE:
            button = getattr(self.ui, f"score{score}RadioButton")
            button.text = f"{score} - {SCALE[score]}"
            self._scoreButtons.addButton(button, score)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadScanButton.connect("clicked(bool)", self.onLoadScan)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.boneThresholdSliderWidget.connect("valueChanged(double)", lambda _value: self._thresholdTimer.start())
        self.ui.showCoverageCheckBox.connect("toggled(bool)", self.onShowCoverage)
        self.ui.alignPrincipalAxesButton.connect("clicked(bool)", self.onAlignPrincipalAxes)
        self.ui.alignLandmarksButton.connect("clicked(bool)", self.onAlignLandmarks)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.startLikertButton.connect("clicked(bool)", self.onStartLikert)
        self.ui.submitScoreButton.connect("clicked(bool)", self.onSubmitScore)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        slicer.app.connect("aboutToQuit()", self._stopRuns)  # no engine process outlives Slicer
        self.ui.cancelButton.enabled = False
        self.ui.openReportButton.enabled = False
        self.ui.submitScoreButton.enabled = False  # until a scoring session is started
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopRuns()
        self.removeObservers()

    def _stopRuns(self) -> None:
        """Cancel a running reconstruction and delete the runs' temporary folders."""
        self._pollTimer.stop()
        for run in (self._run, self._finishedRun):
            if run is not None:
                if run.running:
                    run.cancel()
                run.discard()
        self._run = self._finishedRun = self._outputFolder = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self.ui.statusLabel.text = _("Stopped: the scene was closed.")
        self._stopRuns()  # its results would have no scene and no parameter node to go to
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._run is not None and self._run.running
        hasScan = bool(p and str(p.scanPath) not in ("", ".") and (p.scanPath / "scan.json").is_file())
        self.ui.loadScanButton.enabled = hasScan and not running
        self.ui.applyButton.enabled = hasScan and not running
        self.ui.cancelButton.enabled = running
        self.ui.openReportButton.enabled = not running and self.logic.reportPath(self._outputFolder) is not None
        hasResult = bool(p and p.outputVolume)
        self.ui.boneThresholdSliderWidget.enabled = hasResult
        self.ui.alignPrincipalAxesButton.enabled = hasResult and bool(p.boneSegmentation)
        self.ui.alignLandmarksButton.enabled = hasResult and bool(p.landmarks)
        self.ui.compareButton.enabled = hasResult and bool(p.referenceVolume)

    # Scan and reconstruction

    def onLoadScan(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the scan."), waitCursor=True):
            self.logic.ensureDependencies()
            roiNode = self.logic.showScan(self._parameterNode.scanPath, self._parameterNode.roi)
            self._parameterNode.roi = roiNode

    def onApply(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the reconstruction."), waitCursor=True):
            self.logic.ensureDependencies()
            self._stopRuns()
            self._run = self.logic.startReconstruction(self._parameterNode)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting (loading torch)...")
            self._pollTimer.start()
            self._updateButtons()

    def onPoll(self) -> None:
        from IXGSReconstructionLib.process import format_progress

        run = self._run
        records = run.poll()
        if records:
            record = records[-1]
            self.ui.progressBar.maximum = max(1, int(record["total"]))
            self.ui.progressBar.value = int(record["iteration"])
            self.ui.statusLabel.text = format_progress(record)
        if not run.finished:
            return
        self._pollTimer.stop()
        self._run = None
        if self._parameterNode is None:  # the scene went away meanwhile: nothing to load into
            run.discard()
            return
        if run.error:
            self.ui.statusLabel.text = _("Stopped: {reason}. The scene is unchanged.").format(reason=run.error)
            if not run.cancelled:
                slicer.util.errorDisplay(_("Reconstruction failed: {reason}").format(reason=run.error),
                                         detailedText="\n".join(run.log[-50:]))
        else:
            self._finishedRun = run
            with slicer.util.tryWithErrorDisplay(_("Failed to load the reconstruction."), waitCursor=True):
                result, self._outputFolder = self.logic.loadReconstruction(run.output_path, self._parameterNode)
                if self._outputFolder != run.output_path:  # kept elsewhere: the run's copy is not needed
                    run.discard()
                    self._finishedRun = None
                self.ui.statusLabel.text = _("Done: {name}").format(name=result.volume_node.GetName())
                slicer.util.setSliceViewerLayers(background=result.volume_node, fit=True)
        self._updateButtons()

    def onCancel(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.onPoll()

    def onOpenReport(self) -> None:
        import qt

        path = self.logic.reportPath(self._outputFolder)
        if path is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))

    # Review

    def onThresholdChanged(self) -> None:
        p = self._parameterNode
        if not (p and p.outputVolume and p.boneSegmentation):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to update the bone segmentation."), waitCursor=True):
            self.logic.updateBone(p.outputVolume, p.boneThreshold, p.boneSegmentation)

    def onShowCoverage(self, show: bool) -> None:
        p = self._parameterNode
        if show and p.coverageVolume:
            slicer.util.setSliceViewerLayers(foreground=p.coverageVolume, foregroundOpacity=0.4)
        else:
            slicer.util.setSliceViewerLayers(foreground=None)

    def onAlignPrincipalAxes(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to align to anatomy."), waitCursor=True):
            self.logic.alignToAnatomy(p, useLandmarks=False)

    def onAlignLandmarks(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to align to anatomy."), waitCursor=True):
            self.logic.alignToAnatomy(p, useLandmarks=True)

    def onCompare(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to compare with the CT."), waitCursor=True):
            self.logic.ensureDependencies()
            metrics = self.logic.compareToReference(p)
            self.ui.metricsTableView.setMRMLTableNode(p.metricsTable)
            self.ui.statusLabel.text = _("PSNR {psnr:.2f} dB, SSIM {ssim:.3f}, bone Dice {dice:.3f}").format(**metrics)
            self._showSideBySide(p.outputVolume, p.referenceVolume)

    def _showSideBySide(self, left, right) -> None:
        """Reconstruction in the red view, CT in the yellow one, slices linked."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for viewName, volume in (("Red", left), ("Yellow", right)):
            composite = layoutManager.sliceWidget(viewName).mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetLinkedControl(True)
            layoutManager.sliceWidget(viewName).sliceLogic().FitSliceToAll()

    # Blinded Likert scoring

    def onStartLikert(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the scoring session."), waitCursor=True):
            self.logic.ensureDependencies()
            cases = self.logic.parseLikertCases(self.ui.likertCasesTextEdit.toPlainText())
            self._likert = self.logic.openLikertSession(p, cases)
            self._showNextCase()

    def _showNextCase(self) -> None:
        if self._likertNode is not None:
            slicer.mrmlScene.RemoveNode(self._likertNode)
            self._likertNode = None
        session = self._likert
        shown = session.current()
        total = len(session.cases)
        if shown is None:
            self.ui.likertCaseLabel.text = _("Session complete: {n} cases scored.").format(n=total)
            self.ui.submitScoreButton.enabled = False
            return
        self.ui.likertCaseLabel.text = _("{label} of {total}").format(label=shown.label, total=total)
        self._likertNode = self.logic.showBlindedCase(shown)
        self.ui.likertCommentLineEdit.text = ""
        checked = self._scoreButtons.checkedButton()
        if checked:
            self._scoreButtons.setExclusive(False)
            checked.checked = False
            self._scoreButtons.setExclusive(True)
        self.ui.submitScoreButton.enabled = True
        session.mark_shown()

    def onSubmitScore(self) -> None:
        score = self._scoreButtons.checkedId()
        if score < 1:
            slicer.util.warningDisplay(_("Choose a score from 1 to 5 first."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to record the score."), waitCursor=True):
            self._likert.record(score, self.ui.likertCommentLineEdit.text)
            self.logic.updateLikertTable(self._likert)
            self._showNextCase()


#
# Logic
#


class IXGSReconstructionLogic(ScriptedLoadableModuleLogic):
    """Thin layer between the parameter node and ``IXGSReconstructionLib`` (usable from scripts)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return IXGSReconstructionParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies():
        """torch (SlicerPyTorch) and the engine's pip packages, each after the user agreed."""
        from IXGSReconstructionLib.dependencies import ensure_all

        ensure_all(requester="IXGS")

    def showScan(self, scanPath, roiNode=None):
        """The scan's ROI as an editable markups ROI (initialised to the engine's default) and its poses."""
        from ixgs.scan import read_scan
        from IXGSReconstructionLib.nodes import roi_node_from_roi, view_poses_nodes

        scan = read_scan(scanPath)
        roiNode = roi_node_from_roi(scan.roi, roiNode)
        view_poses_nodes(scan.projection_matrices, [view.shape for view in scan.views], scan.roi.center,
                         name=f"{pathlib.Path(scanPath).name} views")
        return roiNode

    def settings(self, p):
        from IXGSReconstructionLib.nodes import roi_from_roi_node
        from IXGSReconstructionLib.process import ReconstructionSettings

        return ReconstructionSettings(
            method=p.method, preset=p.preset, init=p.init, device=p.device, seed=p.seed,
            refine_poses=p.refinePoses and p.method == "gaussian",  # poses are learned with the Gaussians
            voxel_size_mm=p.voxelSizeMm or None,  # 0 = "auto": the engine's default
            time_budget_s=p.timeBudgetS or None,  # 0 = the engine's default budget for the device
            kernel=p.kernel,
            roi=roi_from_roi_node(p.roi) if p.roi else None,
        )

    def startReconstruction(self, p):
        from IXGSReconstructionLib.process import ReconstructionProcess
        from IXGSReconstructionLib.results import check_keep_destination

        if str(p.outputDirectory) not in ("", "."):
            check_keep_destination(p.outputDirectory)  # now, not after the run

        run = ReconstructionProcess.for_scan(p.scanPath, self.settings(p), python_executable=sys.executable,
                                             output_root=pathlib.Path(slicer.app.temporaryPath))
        logging.info("IXGS: %s", " ".join(run.command_prefix))
        run.start()
        return run

    def loadReconstruction(self, outputPath, p):
        """Load the run's outputs into the scene and keep their files where the user asked; returns
        the result and the folder the files are in."""
        from IXGSReconstructionLib.results import keep_outputs, load_results

        result = load_results(outputPath, name=f"{pathlib.Path(p.scanPath).name} IXGS")
        p.outputVolume = result.volume_node
        p.coverageVolume = result.coverage_node
        p.boneSegmentation = result.segmentation_node
        p.boneThreshold = result.bone_threshold
        folder = pathlib.Path(outputPath)
        if str(p.outputDirectory) not in ("", "."):
            folder = keep_outputs(outputPath, p.outputDirectory)
        return result, folder

    @staticmethod
    def reportPath(outputFolder):
        """The run's report.html, or None (no run yet, or the engine wrote none)."""
        if outputFolder is None:  # no run yet: the engine (torch) may not even be installed
            return None
        from IXGSReconstructionLib.results import report_path

        return report_path(outputFolder)

    def updateBone(self, volumeNode, threshold, segmentationNode):
        from IXGSReconstructionLib.nodes import bone_segmentation, show_volume_rendering

        bone_segmentation(volumeNode, threshold, segmentationNode)
        show_volume_rendering(volumeNode, threshold)

    def alignToAnatomy(self, p, useLandmarks: bool):
        import numpy as np
        from IXGSReconstructionLib import align

        if useLandmarks:
            points = slicer.util.arrayFromMarkupsControlPoints(p.landmarks)
            if len(points) != 3:
                raise ValueError(_("Place exactly 3 points: inferior, superior, anterior."))
            matrix = align.landmark_alignment(*np.asarray(points))
        else:
            matrix = align.alignment_from_segmentation(p.boneSegmentation, p.outputVolume)
        return align.apply_alignment(matrix, [p.outputVolume, p.coverageVolume, p.boneSegmentation])

    def compareToReference(self, p):
        from IXGSReconstructionLib.compare import compare_nodes

        metrics, table, _transform = compare_nodes(p.outputVolume, p.referenceVolume, p.registerReference,
                                                   table_node=p.metricsTable)
        p.metricsTable = table
        return metrics

    @staticmethod
    def parseLikertCases(text: str):
        """One volume file per line; a 'ct:' prefix marks a CT mixed in among the reconstructions."""
        from IXGSReconstructionLib.likert import Case

        cases = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            kind, path = ("ct", line[3:].strip()) if line.lower().startswith("ct:") else ("reconstruction", line)
            if not pathlib.Path(path).is_file():
                raise ValueError(_("Case file not found: {path}").format(path=path))
            cases.append(Case(case_id=path, kind=kind, source=path))
        return cases

    def openLikertSession(self, p, cases):
        from IXGSReconstructionLib.likert import LikertSession

        if str(p.likertCsvPath) in ("", "."):
            raise ValueError(_("Choose the CSV file for the scores."))
        return LikertSession.open(p.likertCsvPath, cases, p.likertEvaluator, p.likertQuestion)

    def showBlindedCase(self, shown):
        """Load the case under its blinded label only (no file name in the node or the views)."""
        node = slicer.util.loadVolume(shown.source, {"name": shown.label, "show": True})
        node.SetAttribute("IXGS.Blinded", "1")
        storage = node.GetStorageNode()
        if storage is not None:  # the file name would reveal the case
            slicer.mrmlScene.RemoveNode(storage)
        slicer.util.resetSliceViews()
        return node

    def updateLikertTable(self, session):
        node = slicer.mrmlScene.GetFirstNodeByName("IXGS Likert scores")
        return session.to_table_node(node)


#
# Test (runs inside Slicer: Reload and Test)
#


class IXGSReconstructionTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ReconstructSmallScan()

    def test_ReconstructSmallScan(self):
        import tempfile

        import numpy as np
        from ixgs.phantom import make_phantom
        from ixgs.simulate import simulate_scan
        from IXGSReconstructionLib.process import ReconstructionProcess, ReconstructionSettings
        from IXGSReconstructionLib.results import load_results

        self.delayDisplay("Simulating a small scan")
        folder = pathlib.Path(tempfile.mkdtemp(dir=slicer.app.temporaryPath))
        scan = simulate_scan(make_phantom("spine", voxel_size_mm=3.0), folder / "scan", n_views=6, detector_px=48)
        run = ReconstructionProcess.for_scan(scan, ReconstructionSettings(method="sart", preset="fast", device="cpu",
                                                                          voxel_size_mm=4.0, iterations=3),
                                             python_executable=sys.executable, output_root=folder)
        run.start()
        self.assertEqual(run.wait(timeout_s=600), 0, run.error)
        result = load_results(run.output_path, "test")
        self.assertGreater(float(np.max(slicer.util.arrayFromVolume(result.volume_node))), 0.0)
        self.assertIsNotNone(result.segmentation_node)
        run.discard()
        self.delayDisplay("Test passed")
