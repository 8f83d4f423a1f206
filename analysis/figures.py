"""What every analysis script shares: the plotting backend and theme, saving, loading a study."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kdablate.study import Study, StudyError, load_study


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, with the project's seaborn theme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", palette="colorblind")
    return plt


def save(fig: Any, out: Path, stem: str) -> list[Path]:
    """``out/<stem>.png`` and ``.pdf``; closes the figure."""
    import matplotlib.pyplot as plt

    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def study_or_exit(arg: str) -> Study | None:
    """The study, or None after printing the one-line error (the caller returns 2)."""
    try:
        return load_study(arg)
    except StudyError as e:
        print(f"analysis: error: {e}", file=sys.stderr)
        return None
