"""Class-similarity heatmaps: what a model's own explanations say vs. what a teacher says.

    python -m analysis.similarity STUDY [--out figures]

For each arm in the study's ``analysis.heatmaps``, reads from MLflow the final
epoch's explanation-derived similarity matrix (K x K: row y averages the
structure r over training samples of class y) of every seed, averages it over
seeds, and draws it beside the teacher's average soft-target structure. Titles
give the Spearman correlation of the off-diagonal entries (mean ± std over seeds
of the logged ``train/similarity_spearman``). Writes ``similarity.{png,pdf,csv}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from kdablate import tracking
from analysis.figures import pyplot, save, study_or_exit
from kdablate.study import Study


def load_matrices(study: Study, arm: str) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """Per finished seed of ``arm``: explanation matrix, teacher matrix, final Spearman."""
    client = tracking.client()
    exp = client.get_experiment_by_name(study.name)
    hashes = {c.config_hash() for c in study.cells if c.arm == arm}
    runs = [r for r in tracking.search_cells(client, exp.experiment_id, "FINISHED") if r.data.tags.get("config_hash") in hashes] if exp else []
    expl, teach, rho = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            try:
                folder = Path(client.download_artifacts(run.info.run_id, "similarity", tmp))
            except Exception:  # noqa: BLE001 - a run without matrices is skipped, not fatal
                continue
            expl.append(np.array(json.loads((folder / "similarity_explanation.json").read_text())))
            if (folder / "similarity_teacher.json").exists():
                teach.append(np.array(json.loads((folder / "similarity_teacher.json").read_text())))
            rho.append(run.data.metrics.get("train/similarity_spearman", float("nan")))
    return expl, teach, rho


def plot(panels: list[tuple[str, np.ndarray]], out: Path) -> list[Path]:
    import seaborn as sns

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False)
    # Each panel on its own scale: a teacher at T=4 is far flatter than a sharp explanation softmax,
    # and the question is which classes are similar, not how peaked the rows are.
    for ax, (title, m) in zip(axes[0], panels):
        sns.heatmap(m, ax=ax, cmap="viridis", vmin=0, square=True, cbar=True, cbar_kws={"shrink": 0.7})
        ax.set(title=title, xlabel="class c", ylabel="true class y")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    return save(fig, out, "similarity")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("--out", type=Path, default=Path("figures"))
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    study = study_or_exit(args.study)
    if study is None:
        return 2
    if not study.config.analysis.heatmaps:
        return 0  # nothing to draw for this study
    panels, rows, teacher = [], [], None
    for arm in study.config.analysis.heatmaps:
        expl, teach, rho = load_matrices(study, arm)
        if not expl:
            continue
        teacher = teacher if teacher is not None or not teach else np.mean(teach, 0)
        r = np.array(rho, dtype=float)
        std = r.std(ddof=1) if len(r) > 1 else float("nan")
        rows.append({"arm": arm, "spearman_mean": r.mean(), "spearman_std": std, "n": len(r)})
        panels.append((f"{arm}\nSpearman vs teacher {r.mean():.2f} ± {std:.2f}", np.mean(expl, 0)))
    if not panels:
        print(f"analysis: error: no similarity matrices for {study.config.analysis.heatmaps} in "
              f"{tracking.tracking_uri()}; run 'make study STUDY={study.name}' first", file=sys.stderr)
        return 2
    if teacher is not None:
        panels.insert(0, ("teacher soft targets (class means)", teacher))
    out = args.out / study.name
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "similarity.csv", index=False)
    paths = plot(panels, out)
    for r in rows:
        print(f"{r['arm']}: Spearman vs teacher {r['spearman_mean']:.3f} ± {r['spearman_std']:.3f} (n={r['n']})")
    print(f"heatmaps: {', '.join(str(q) for q in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
