"""What every figure shares: the file-only backend, one seaborn theme sized for a paper
column, a colour-blind-safe palette, and saving as PNG and PDF."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kdablate.study import Study, StudyError, load_study

COLUMN_IN = 3.4  # one column of a two-column paper (ACCV, CVPR: 3.25-3.4 in)
PAGE_IN = 6.9  # the full text width
THEME_RC = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
            "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7,
            # TrueType in PDFs: editable text, and what most publishers ask for.
            "pdf.fonttype": 42, "ps.fonttype": 42}


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, with the project's seaborn theme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", palette="colorblind", rc=THEME_RC)
    return plt


def save(fig: Any, out: Path, stem: str) -> list[Path]:
    """``out/<stem>.png`` and ``.pdf``; closes the figure."""
    import matplotlib.pyplot as plt

    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=300, bbox_inches="tight")
    plt.close(fig)
    return paths


def study_or_exit(arg: str) -> Study | None:
    """The study, or None after printing the one-line error (the caller returns 2)."""
    try:
        return load_study(arg)
    except StudyError as e:
        print(f"analysis: error: {e}", file=sys.stderr)
        return None
