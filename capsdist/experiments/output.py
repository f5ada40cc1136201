"""What an experiment writes: its result as JSON, a Markdown table and a PNG plot, side by side, each atomically."""

from __future__ import annotations

import json
from pathlib import Path

from capsdist.core.files import write_atomic, write_figure


def figure(panels: int):
    """A matplotlib figure (off-screen backend) with `panels` axes side by side: (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    return fig, list(axes[0])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table of strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def write_outputs(out_dir: str | Path, name: str, result: dict, table: str, fig) -> list[Path]:
    """Write out_dir/<name>.json (result), .md (table) and .png (fig, then closed); returns the three paths."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")]
    write_atomic(paths[0], (json.dumps(result, indent=1) + "\n").encode())
    write_atomic(paths[1], table.encode())
    fig.tight_layout()
    write_figure(paths[2], fig)
    plt.close(fig)
    return paths
