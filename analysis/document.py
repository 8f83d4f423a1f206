"""``Report``: a study's report.md as it is being written, and the files it links.

Every section of ``analysis.report`` and ``analysis.artifacts`` adds to the report through
these methods only, so what report.md says and which files sit beside it cannot drift
apart: a figure, table or CSV is written and registered in one call.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from analysis import tables
from analysis.figures import save


@dataclasses.dataclass
class Report:
    """The report of ``study`` being written into ``out``.

    metric: what the tables compare; rule: the reporting rule of ``metric``, printed in every
    caption."""

    out: Path
    study: str
    metric: str
    rule: str
    _lines: list[str] = dataclasses.field(default_factory=list, init=False, repr=False)
    _files: list[Path] = dataclasses.field(default_factory=list, init=False, repr=False)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file written so far, report.md last once ``finish`` has run."""
        return tuple(self._files)

    def lines(self, lines: list[str]) -> None:
        """Add Markdown lines as they are (each section ends its own paragraphs)."""
        self._lines += lines

    def heading(self, title: str, level: int = 2) -> None:
        """A section (level 2) or subsection (level 3) title."""
        self._lines += [f"{'#' * level} {title}", ""]

    def paragraph(self, text: str) -> None:
        """One paragraph of prose."""
        self._lines += [text, ""]

    def bullets(self, items: list[str]) -> None:
        """A bulleted list, one item per comparison."""
        self._lines += [f"- {item}" for item in items] + [""]

    def note(self, text: str) -> None:
        """Say in the report why something is not there."""
        self._lines += [f"> {text}", ""]

    def csv(self, frame: pd.DataFrame, stem: str, index: bool = False) -> None:
        """Write ``frame`` as ``<stem>.csv`` beside the report; a caption that wants it links it."""
        frame.to_csv(self.out / f"{stem}.csv", index=index)
        self._files.append(self.out / f"{stem}.csv")

    def figure(self, fig: object, stem: str, caption: str) -> None:
        """Save ``fig`` as PNG and PDF and link it with its caption."""
        self._files += save(fig, self.out, stem)
        self._lines += [f"![{stem}]({stem}.png)", "", f"*{tables.md_escape(caption)}* [PDF]({stem}.pdf)", ""]

    def table(self, frame: pd.DataFrame, head: list[str], rows: list[list[str]], stem: str, cap: str) -> None:
        """Write a table as CSV (the numbers), Markdown and LaTeX, and put it in the report."""
        self.csv(frame, stem)
        (self.out / f"{stem}.md").write_text(tables.markdown(head, rows, cap))
        (self.out / f"{stem}.tex").write_text(tables.latex(head, rows, cap, f"{self.study}-{stem}"))
        self._files += [self.out / f"{stem}.{x}" for x in ("md", "tex")]
        self._lines += [tables.markdown(head, rows, cap), f"Also as [LaTeX]({stem}.tex) and [CSV]({stem}.csv).", ""]

    def finish(self) -> Path:
        """Write report.md (everything added so far) and return its path."""
        path = self.out / "report.md"
        path.write_text("\n".join(self._lines) + "\n")
        self._files.append(path)
        return path
