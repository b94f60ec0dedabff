"""Heat maps of the dispersion transform R and of dispersed example kernels (docs figure).

    python scripts/plot_dispersed_kernel.py            # writes docs/ops/img/*.png

Needs matplotlib (the optional ``docs`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from unet_surgery.io import atomic_path
from unet_surgery.ops.dispersion import dispersion_transform

EXAMPLES = {
    "Sobel (x)": np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]),
    "Laplacian": np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]),
    "box / 9": np.full((3, 3), 1.0 / 9.0),
}


def _annotated(ax, data: np.ndarray, title: str, vmax: float, fmt: str = "{:.2f}") -> None:
    im = ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if data.size <= 49:
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6)
    return im


def plot(out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.array(dispersion_transform(3, 5, 2, 3, 0.05))
    written = []

    fig, ax = plt.subplots(figsize=(4.2, 8.0), dpi=150)
    vmax = float(np.abs(r).max())
    im = ax.imshow(r, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(9), [f"a{i // 3}{i % 3}" for i in range(9)], fontsize=7, rotation=90)
    ax.set_yticks(range(25), [f"b{i // 5}{i % 5}" for i in range(25)], fontsize=6)
    ax.set_title("R (25x9): 3x3 -> 5x5, scale 2, eta 0.05", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    target = out_dir / "dispersion_R.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    written.append(target)

    fig, axes = plt.subplots(2, len(EXAMPLES), figsize=(3.0 * len(EXAMPLES), 6.0), dpi=150)
    for col, (name, kernel) in enumerate(EXAMPLES.items()):
        big = (r @ kernel.ravel()).reshape(5, 5)
        vmax = float(max(np.abs(kernel).max(), np.abs(big).max()))
        _annotated(axes[0, col], kernel, f"{name} 3x3", vmax)
        _annotated(axes[1, col], big, f"{name} dispersed 5x5", vmax)
    fig.tight_layout()
    target = out_dir / "dispersed_kernels.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "docs" / "ops" / "img"
    parser.add_argument("--out-dir", type=Path, default=default)
    args = parser.parse_args(argv)
    try:
        written = plot(args.out_dir)
    except ImportError as exc:
        print(f"plot_dispersed_kernel: needs matplotlib ({exc})", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
