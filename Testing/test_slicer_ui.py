"""Module files that only real Slicer runs: every .ui parses, every widget the code names exists,
every parameter a widget binds exists, and CMake lists every file the modules ship."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("IXGSReconstruction", "IXGSStandardize")


def _ui(module: str) -> ET.ElementTree:
    return ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")


def _widget_names(tree: ET.ElementTree) -> set[str]:
    return {widget.get("name") for widget in tree.iter("widget")}


def _parameter_fields(module: str) -> set[str]:
    """Fields of the @parameterNodeWrapper class in the module file."""
    source = ast.parse((ROOT / module / f"{module}.py").read_text())
    for node in source.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


@pytest.mark.parametrize("module", MODULES)
def test_ui_parses_and_names_every_widget_the_code_uses(module):
    tree = _ui(module)
    assert tree.getroot().tag == "ui"
    names = _widget_names(tree)
    code = (ROOT / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    used |= {f"score{n}RadioButton" for n in range(1, 6)} if "RadioButton\")" in code else set()
    assert used, "the widget uses no ui names?"
    missing = sorted(used - names)
    assert not missing, f"{module}.ui lacks widgets {missing}"
    assert len(names) == len([w for w in tree.iter("widget")]), "duplicate widget names"


@pytest.mark.parametrize("module", MODULES)
def test_bound_widgets_name_existing_parameters(module):
    tree = _ui(module)
    fields = _parameter_fields(module)
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    assert bound
    unknown = {w: p for w, p in bound.items() if p not in fields}
    assert not unknown, f"{module}.ui binds unknown parameters {unknown}"
    assert len(set(bound.values())) == len(bound), "a parameter is bound to two widgets"


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_script_and_resource(module):
    cmake = (ROOT / module / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", module)
    listed = set(re.findall(r"^\s+([\w/]+\.(?:py|ui|png))\s*$", cmake, flags=re.M))
    on_disk = {str(p.relative_to(ROOT / module)) for p in (ROOT / module).rglob("*")
               if p.suffix in (".py", ".ui", ".png") and "__pycache__" not in p.parts}
    assert listed == on_disk
    assert "WITH_GENERIC_TESTS" in cmake and "slicerMacroBuildScriptedModule" in cmake


def test_extension_cmake_has_the_required_fields():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                  "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({field} "[^"]+"\)', cmake), field
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    for module in MODULES:
        assert f"add_subdirectory({module})" in cmake
    assert "find_package(Slicer REQUIRED)" in cmake and "Slicer_EXTENSION_CPACK" in cmake
    assert (ROOT / "Resources" / "Icons" / "IXGS.png").is_file()
    assert "ixgs/*.py" in (ROOT / "IXGSReconstruction" / "CMakeLists.txt").read_text()


def test_no_dependency_is_installed_at_import_time():
    for module in MODULES:
        code = (ROOT / module / f"{module}.py").read_text()
        top_level = [line for line in code.splitlines() if re.match(r"^(import|from) ", line)]
        assert not any("torch" in line or "ixgs" in line for line in top_level), top_level
    for path in (ROOT / "IXGSReconstruction" / "IXGSReconstructionLib").glob("*.py"):
        assert "pip_install(" not in path.read_text().split("def ensure_packages")[0], path.name


def test_parameter_choices_match_the_logic():
    pytest.importorskip("slicer", reason="needs PyPI slicer-core (pip install slicer-core)")
    from ixgs import reconstruct

    code = (ROOT / "IXGSReconstruction" / "IXGSReconstruction.py").read_text()
    for field, options in (("preset", tuple(reconstruct.PRESETS)), ("method", reconstruct.METHODS),
                           ("init", reconstruct.INITS), ("device", reconstruct.DEVICES)):
        choice = re.search(rf"^\s+{field}: Annotated\[str, Choice\((\[.*?\])\)\]", code, flags=re.M)
        assert choice and tuple(ast.literal_eval(choice.group(1))) == options, field


def test_time_budget_and_kernel_choices_match_the_engine():
    """The time budget's default is the engine's (0 stands for none); the kernel combo offers the
    module's KERNELS, the engine's own."""
    pytest.importorskip("slicer", reason="needs PyPI slicer-core (pip install slicer-core)")
    import sys

    from ixgs import reconstruct

    sys.path.insert(0, str(ROOT / "IXGSReconstruction"))
    from IXGSReconstructionLib.options import KERNELS

    code = (ROOT / "IXGSReconstruction" / "IXGSReconstruction.py").read_text()
    budget = re.search(r"^\s+timeBudgetS: Annotated\[float, WithinRange\(0\.0, [\d.]+\)\] = ([\d.]+)", code, flags=re.M)
    assert budget and float(budget.group(1)) == 0.0 and reconstruct.ReconstructionSettings().time_budget_s is None
    assert re.search(r'^\s+kernel: Annotated\[str, Choice\(list\(KERNELS\)\)\] = "auto"', code, flags=re.M)
    assert KERNELS[0] == "auto" and len(set(KERNELS)) == len(KERNELS)
    assert tuple(reconstruct.KERNELS) == KERNELS  # the engine's setting
