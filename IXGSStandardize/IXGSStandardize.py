"""IXGSStandardize: make radiographs look like the attenuation line integrals the reconstruction expects.

The widget binds the .ui to a parameter node and calls logic; the logic lives in
``IXGSStandardizeLib`` (Qt-free, tested headless with slicer-core) and the engine's
``ixgs.standardize``.
"""
import pathlib
from typing import Annotated

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


class IXGSStandardize(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("IXGS Standardize")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "IXGS")]
        self.parent.dependencies = ["IXGSReconstruction"]  # shares its dependency handling
        self.parent.contributors = ["IXGS project"]
        self.parent.helpText = _("""
Standardize X-ray images before reconstruction: flat field and -log for raw detector images, CLAHE,
bone emphasis (classical), or a learned pix2pix model when installed. The output keeps each view's
geometry and is written as a new scan in attenuation.
Documentation: docs/slicer.md in the IXGS source tree.
""")
        self.parent.acknowledgementText = _("Built on 3D Slicer's scripted module template.")


@parameterNodeWrapper
class IXGSStandardizeParameterNode:
    scanPath: pathlib.Path
    intensity: Annotated[str, Choice(["attenuation", "transmission"])] = "attenuation"
    method: Annotated[str, Choice(["classical", "pix2pix"])] = "classical"
    claheClipLimit: Annotated[float, WithinRange(0.001, 1.0)] = 0.01
    claheTilePx: Annotated[int, WithinRange(8, 1024)] = 64
    boneEmphasis: Annotated[float, WithinRange(0.0, 3.0)] = 0.5
    backgroundSigmaPx: Annotated[float, WithinRange(0.5, 64.0)] = 8.0
    outputPath: pathlib.Path


class IXGSStandardizeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IXGSStandardize.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IXGSStandardizeLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.loadViewsButton.connect("clicked(bool)", self.onLoadViews)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def onLoadViews(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the views."), waitCursor=True):
            self.logic.ensureDependencies()
            import qt

            nodes = self.logic.loadViews(self._parameterNode.scanPath)
            for node in nodes:
                self.ui.inputNodesComboBox.setCheckState(node, qt.Qt.Checked)
            self._parameterNode.intensity = "attenuation"  # read_scan already applied -log
            slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)

    def onApply(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Standardization failed."), waitCursor=True):
            self.logic.ensureDependencies()
            nodes = list(self.ui.inputNodesComboBox.checkedNodes())
            outputs, written = self.logic.process(self._parameterNode, nodes)
            self._showSideBySide(nodes[0], outputs[0])
            message = _("{n} images standardized.").format(n=len(outputs))
            if written is not None:
                message += " " + _("Scan written to {path}").format(path=written)
            self.ui.statusLabel.text = message

    def _showSideBySide(self, original, standardized) -> None:
        """Original in the red view, standardized in the yellow one, slices linked."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for viewName, volume in (("Red", original), ("Yellow", standardized)):
            sliceWidget = layoutManager.sliceWidget(viewName)
            sliceWidget.mrmlSliceNode().SetOrientation("Axial")
            composite = sliceWidget.mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetLinkedControl(True)
            sliceWidget.sliceLogic().FitSliceToAll()


class IXGSStandardizeLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return IXGSStandardizeParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies():
        """The engine needs torch (SlicerPyTorch) and a few pip packages; asked for, never at import."""
        from IXGSReconstructionLib.dependencies import ensure_all

        ensure_all(requester="IXGS Standardize")

    def loadViews(self, scanPath):
        from IXGSStandardizeLib.logic import radiograph_nodes_from_scan

        return radiograph_nodes_from_scan(scanPath)

    def process(self, p, nodes):
        """Standardize ``nodes`` (or the scan's views when none are given); write a scan when asked."""
        from ixgs.standardize import ClassicalSettings
        from IXGSStandardizeLib.logic import standardize_nodes, write_scan_from_nodes

        if not nodes:
            if str(p.scanPath) in ("", "."):
                raise ValueError(_("Choose a scan folder or check radiograph nodes."))
            nodes = self.loadViews(p.scanPath)
            p.intensity = "attenuation"
        settings = ClassicalSettings(p.claheClipLimit, p.claheTilePx, p.boneEmphasis, p.backgroundSigmaPx)
        outputs = standardize_nodes(nodes, p.method, settings, p.intensity)
        written = None
        if str(p.outputPath) not in ("", "."):
            written = write_scan_from_nodes(outputs, p.outputPath)
        return outputs, written


class IXGSStandardizeTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_StandardizeSimulatedScan()

    def test_StandardizeSimulatedScan(self):
        import tempfile

        from ixgs.phantom import make_phantom
        from ixgs.scan import read_scan
        from ixgs.simulate import simulate_scan

        folder = pathlib.Path(tempfile.mkdtemp(dir=slicer.app.temporaryPath))
        scan = simulate_scan(make_phantom("knee", voxel_size_mm=3.0), folder / "raw", n_views=3, detector_px=48,
                             transmission=True)
        logic = IXGSStandardizeLogic()
        p = logic.getParameterNode()
        p.scanPath = scan
        p.outputPath = folder / "standardized"
        outputs, written = logic.process(p, [])
        self.assertEqual(len(outputs), 3)
        self.assertEqual(len(read_scan(written).views), 3)
        self.delayDisplay("Test passed")
