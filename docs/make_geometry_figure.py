"""Draw docs/geometry.png, the figure of docs/geometry.md (needs matplotlib; not used at runtime).

Run: python docs/make_geometry_figure.py
The beam directions come from ixgs.simulate.beam_direction, so the figure shows what the code does.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Ellipse  # noqa: E402

from ixgs.simulate import beam_direction  # noqa: E402

SOD, SID = 0.62, 1.0  # drawing units


def c_arm(ax, source, beam, label, color):
    """Source dot, detector bar (perpendicular to the beam at SID) and the central ray."""
    detector = source + SID * beam
    across = np.array([-beam[1], beam[0]]) * 0.28
    ax.plot(*zip(source, detector), color=color, lw=1, ls="--")
    ax.plot(*zip(detector - across, detector + across), color=color, lw=4, solid_capstyle="butt")
    ax.add_patch(Circle(source, 0.035, color=color))
    ax.annotate(label, detector + 0.2 * beam, color=color, ha="center", va="center", fontsize=8)


def axial(ax):
    ax.set_title("Primary angle (axial, seen from the feet)", fontsize=9)
    ax.add_patch(Ellipse((0, 0), 0.9, 0.6, fc="0.9", ec="0.4"))
    for angle, color in ((0.0, "k"), (40.0, "tab:blue"), (-40.0, "tab:red")):
        beam3 = beam_direction(angle, 0.0)
        beam = np.array([beam3[0], -beam3[1]])  # screen: x = patient left (right), up = anterior (-y)
        name = "AP 0" if angle == 0 else (f"LAO +{angle:.0f}" if angle > 0 else f"RAO {angle:.0f}")
        c_arm(ax, -SOD * beam, beam, name, color)
    ax.annotate("", (0.55, -0.95), (0.25, -0.95), arrowprops={"arrowstyle": "->"})
    ax.text(0.58, -0.95, "+x  L", fontsize=8, va="center")
    ax.annotate("", (-0.95, 0.3), (-0.95, 0.0), arrowprops={"arrowstyle": "->"})
    ax.text(-0.95, 0.33, "A  (-y)", fontsize=8, ha="center")
    ax.text(0, 0, "patient", ha="center", va="center", fontsize=8)


def sagittal(ax):
    ax.set_title("Secondary angle (sagittal, seen from the left)", fontsize=9)
    ax.add_patch(Ellipse((0, 0), 0.45, 1.3, fc="0.9", ec="0.4"))
    for angle, color in ((0.0, "k"), (30.0, "tab:green"), (-30.0, "tab:purple")):
        beam3 = beam_direction(0.0, angle)
        beam = np.array([beam3[1], beam3[2]])  # screen: right = posterior (+y), up = head (+z)
        name = "0" if angle == 0 else (f"CRA +{angle:.0f}" if angle > 0 else f"CAU {angle:.0f}")
        c_arm(ax, -SOD * beam, beam, name, color)
    ax.text(-0.35, 0.95, "anterior", fontsize=8, ha="right")
    ax.annotate("", (0.9, -0.95), (0.6, -0.95), arrowprops={"arrowstyle": "->"})
    ax.text(0.6, -0.88, "+y  P", fontsize=8)
    ax.annotate("", (-0.95, -0.6), (-0.95, -0.9), arrowprops={"arrowstyle": "->"})
    ax.text(-0.95, -0.55, "+z  H", fontsize=8, ha="center")


def detector(ax):
    ax.set_title("Image: pixel centres, principal point", fontsize=9)
    rows, cols = 4, 5
    for r in range(rows + 1):
        ax.plot([-0.5, cols - 0.5], [r - 0.5, r - 0.5], color="0.7", lw=0.8)
    for c in range(cols + 1):
        ax.plot([c - 0.5, c - 0.5], [-0.5, rows - 0.5], color="0.7", lw=0.8)
    u, v = np.meshgrid(np.arange(cols), np.arange(rows))
    ax.plot(u.ravel(), v.ravel(), ".", color="0.3")
    ax.annotate("(u, v) = (0, 0)", (0, 0), (-1.0, -1.0), fontsize=8, arrowprops={"arrowstyle": "->"})
    centre = np.array([(cols - 1) / 2, (rows - 1) / 2])
    principal = centre + np.array([0.8, -0.5])
    ax.plot(*centre, "k+", ms=10)
    ax.plot(*principal, "o", color="tab:red", ms=6)
    ax.annotate("", principal, centre, arrowprops={"arrowstyle": "->", "color": "tab:red"})
    ax.text(principal[0] + 0.15, principal[1] - 0.15, "central ray\n(centre + offset)", color="tab:red", fontsize=8)
    ax.annotate("", (cols + 0.2, -0.5), (cols - 0.5, -0.5), arrowprops={"arrowstyle": "->"})
    ax.text(cols + 0.25, -0.5, "u (column)", fontsize=8, va="center")
    ax.annotate("", (-0.5, rows + 0.3), (-0.5, rows - 0.5), arrowprops={"arrowstyle": "->"})
    ax.text(-0.5, rows + 0.6, "v (row)", fontsize=8, ha="center")
    ax.text(0.5, rows + 1.2, "AP view: u -> patient's left, v -> feet", fontsize=8)
    ax.set_ylim(rows + 1.6, -1.6)  # rows run down the page


def main() -> None:
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    axial(axes[0])
    sagittal(axes[1])
    detector(axes[2])
    for ax in axes[:2]:
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
    for ax in axes:
        ax.set_aspect("equal")
        ax.axis("off")
    axes[2].set_xlim(-1.6, 7.8)
    figure.tight_layout()
    out = Path(__file__).with_name("geometry.png")
    figure.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
