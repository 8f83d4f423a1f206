"""``Report``: a study's report.md as it is being written, and the files it links.

Every section of ``analysis.report`` and ``analysis.artifacts`` adds to the report through
these methods only, so what report.md says and which files sit beside it cannot drift
apart: a figure, table or CSV is written and registered in one call. report.html is
report.md's own text rendered to one self-contained page (figures embedded as PNG data
URIs, tables as HTML tables), so both always say the same.

Links name the files beside the report ('table.csv'), which works on disk. MLflow's artifact
viewer resolves a relative link against the server's root, not the artifact's folder, draws
no relative image, and shows .html in a sandboxed frame from a blob: URL; so the copies
logged to MLflow (``Report.mlflow_copies``) link each file through the server's
'get-artifact?path=<folder>/<file>&run_uuid=<run>' route instead.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from analysis import tables
from analysis.figures import save

# A Markdown link or image whose target is one plain word (no spaces or parentheses).
LINK = re.compile(r"(!?)\[((?:\\.|[^\]\\])*)\]\(([^()\s]+)\)")
IMAGE_LINE = re.compile(r"!\[((?:\\.|[^\]\\])*)\]\(([^()\s]+)\)")
TEXT = ' class="text"'  # a text column of a table: left-aligned
ESCAPABLE = set("\\`*_{}[]()#+-.!|>")
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:14px;line-height:1.5;color:#1f2328;
margin:0 auto;max-width:1100px;padding:16px 24px}
h1,h2,h3{line-height:1.25;margin:1.2em 0 .5em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em}
code{font-family:ui-monospace,Menlo,monospace;font-size:90%;background:#f6f8fa;padding:.1em .3em;border-radius:4px}
table{border-collapse:collapse;margin:.5em 0 1em;font-variant-numeric:tabular-nums;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f6f8fa}
.text{text-align:left}blockquote{margin:.8em 0;padding:.2em 1em;border-left:4px solid #d0d7de;color:#59636e}
figure{margin:1em 0 .3em}figure img{max-width:100%;height:auto}
"""
# In MLflow's viewer the page comes from a blob: URL, against which no relative link resolves:
# resolve them against the MLflow page that made the frame (or the server's root).
RESOLVE = """<script>
if (location.protocol === "blob:") {
  const page = document.referrer.startsWith("http") ? document.referrer : new URL(location.href).origin + "/";
  for (const a of document.querySelectorAll("a.artifact")) a.href = new URL(a.getAttribute("href"), page).href;
}
</script>"""


def inline(text: str, href: Callable[[str], str] = str) -> str:
    """HTML of one line of the Markdown that ``Report`` writes: backslash escapes, code spans,
    links (their targets through ``href``), **strong** and *emphasis*; everything else escaped."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPABLE:
            out.append(html.escape(text[i + 1]))
            i += 2
        elif c == "`" and (end := text.find("`", i + 1)) > i:
            out.append(f"<code>{html.escape(text[i + 1:end])}</code>")
            i = end + 1
        elif c == "[" and (m := LINK.match(text, i)) and not m.group(1):
            target = href(m.group(3))
            cls = ' class="artifact"' if target != m.group(3) else ""
            out.append(f'<a{cls} href="{html.escape(target)}">{inline(m.group(2), href)}</a>')
            i = m.end()
        elif c == "*" and (span := _emphasis(text, i)) is not None:
            tag, inner, i = span
            out.append(f"<{tag}>{inline(inner, href)}</{tag}>")
        else:
            out.append(html.escape(c))
            i += 1
    return "".join(out)


def _emphasis(text: str, i: int) -> tuple[str, str, int] | None:
    """('strong' or 'em', the text inside, the index after the closing delimiter) for '**' or '*'
    at ``i`` that opens (a non-space follows) and closes later (after a non-space); else None,
    so '*** p < 0.001' stays literal."""
    run = len(text[i:]) - len(text[i:].lstrip("*"))
    if run > 2 or i + run >= len(text) or text[i + run].isspace():
        return None
    delim, j = "*" * run, i + run
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == "`" and (end := text.find("`", j + 1)) > j:
            j = end + 1
        elif text.startswith(delim, j) and not text[j - 1].isspace() and (run == 2 or not text.startswith("**", j)):
            return ("strong" if run == 2 else "em"), text[i + run:j], j + run
        else:
            j += 2 if run == 1 and text.startswith("**", j) else 1
    return None


def cells(row: str) -> list[str]:
    """The cells of a pipe-table row ('\\|' inside a cell is no separator)."""
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]


def table_html(lines: list[str], href: Callable[[str], str]) -> str:
    """A pipe table (header, separator, rows) as an HTML table; text columns left, numbers right."""
    head = cells(lines[0])
    left = [h in tables.TEXT_COLUMNS for h in head]

    def row(values: list[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}{TEXT if k < len(left) and left[k] else ''}>{inline(v, href)}</{tag}>"
                                for k, v in enumerate(values)) + "</tr>"

    body = "".join(row(cells(line), "td") for line in lines[2:])
    return f"<table><thead>{row(head, 'th')}</thead><tbody>{body}</tbody></table>"


def opens_block(line: str) -> bool:
    """Whether ``line`` starts a block other than a paragraph (so it cannot continue one)."""
    return bool(re.match(r"#{1,6} ", line) or IMAGE_LINE.fullmatch(line.strip()) or line.startswith(("|", "- ", "> ")))


def blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """The Markdown's blocks in order, as (kind, lines): heading, figure, table, list, quote or paragraph."""
    lines, out, i = markdown.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        kind = ("heading" if re.match(r"#{1,6} ", line) else "figure" if IMAGE_LINE.fullmatch(line.strip())
                else "table" if line.startswith("|") else "list" if line.startswith("- ")
                else "quote" if line.startswith("> ") else "paragraph")
        prefix = {"table": "|", "list": "- ", "quote": "> "}.get(kind)
        j = i + 1
        while kind not in ("heading", "figure") and j < len(lines) and lines[j].strip() and (
                lines[j].startswith(prefix) if prefix else not opens_block(lines[j])):
            j += 1
        out.append((kind, lines[i:j]))
        i = j
    return out


def body_html(markdown: str, href: Callable[[str], str], image: Callable[[str], str]) -> str:
    """The HTML of ``markdown``'s blocks; images' sources through ``image``, links' targets through ``href``."""
    parts = []
    for kind, lines in blocks(markdown):
        if kind == "heading":
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            parts.append(f"<h{level}>{inline(lines[0][level:].strip(), href)}</h{level}>")
        elif kind == "figure":
            alt, src = IMAGE_LINE.fullmatch(lines[0].strip()).groups()
            parts.append(f'<figure><img src="{html.escape(image(src))}" alt="{html.escape(alt)}"></figure>')
        elif kind == "table":
            parts.append(table_html(lines, href))
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{inline(x[2:], href)}</li>" for x in lines) + "</ul>")
        elif kind == "quote":
            parts.append("<blockquote><p>" + " ".join(inline(x[2:], href) for x in lines) + "</p></blockquote>")
        else:
            parts.append("<p>" + " ".join(inline(x, href) for x in lines) + "</p>")
    return "\n".join(parts)


def page(markdown: str, title: str, href: Callable[[str], str], image: Callable[[str], str], script: str = "") -> str:
    """A whole HTML document of ``markdown``, styled inline (no file or network needed to show it)."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body_html(markdown, href, image)}\n{script}</body>\n</html>\n")


def data_uri(path: Path) -> str:
    """A PNG as a data: URI, so the page needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def artifact_link(run_id: str, folder: str) -> Callable[[str], str]:
    """File name -> the MLflow server's link to it in ``run_id``'s artifacts under ``folder``, relative
    to the UI's root (as MLflow's own UI fetches artifacts)."""
    return lambda name: f"get-artifact?path={quote(f'{folder}/{name}', safe='')}&run_uuid={quote(run_id, safe='')}"


@dataclasses.dataclass
class Report:
    """The report of ``study`` being written into ``out``.

    metric: what the tables compare; rule: the reporting rule of ``metric``, printed in every
    caption."""

    out: Path
    study: str
    metric: str
    rule: str
    interval_note: str = ""  # appended to every caption that speaks of a CI (too few seeds for one)
    _lines: list[str] = dataclasses.field(default_factory=list, init=False, repr=False)
    _files: list[Path] = dataclasses.field(default_factory=list, init=False, repr=False)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file written so far: report.md after ``finish``, then report.html after ``write_html``."""
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
        """Write ``frame`` as ``<stem>.csv`` beside the report, its numbers rounded to the digits the
        report prints (``tables.rounded``); a caption that wants it links it."""
        tables.rounded(frame).to_csv(self.out / f"{stem}.csv", index=index)
        self._files.append(self.out / f"{stem}.csv")

    def figure(self, fig: object, stem: str, caption: str) -> None:
        """Save ``fig`` as PNG and PDF and link it with its caption."""
        self._files += save(fig, self.out, stem)
        caption += f" {self.interval_note}" if self.interval_note and "CI" in caption else ""
        self._lines += [f"![{stem}]({stem}.png)", "", f"*{tables.md_escape(caption)}* [PDF]({stem}.pdf)", ""]

    def table(self, frame: pd.DataFrame, head: list[str], rows: list[list[str]], stem: str, cap: str) -> None:
        """Write a table as CSV (the numbers), Markdown and LaTeX, and put it in the report."""
        self.csv(frame, stem)
        (self.out / f"{stem}.md").write_text(tables.markdown(head, rows, cap))
        (self.out / f"{stem}.tex").write_text(tables.latex(head, rows, cap, f"{self.study}-{stem}"))
        self._files += [self.out / f"{stem}.{x}" for x in ("md", "tex")]
        self._lines += [tables.markdown(head, rows, cap), f"Also as [LaTeX]({stem}.tex) and [CSV]({stem}.csv).", ""]

    @property
    def markdown(self) -> str:
        """report.md's text: everything added so far."""
        return "\n".join(self._lines) + "\n"

    def finish(self) -> Path:
        """Write report.md (everything added so far) and return its path."""
        path = self.out / "report.md"
        path.write_text(self.markdown)
        self._files.append(path)
        return path

    def write_html(self) -> Path:
        """Write report.html, report.md's content as one self-contained page, and return its path."""
        path = self.out / "report.html"
        path.write_text(self.render_html(self.markdown, str))
        self._files.append(path)
        return path

    def render_html(self, markdown: str, href: Callable[[str], str], script: str = "") -> str:
        """``markdown`` as report.html: this report's PNGs embedded, links to its files through ``href``."""
        mine = {p.name for p in self._files}

        def image(src: str) -> str:
            return data_uri(self.out / src) if src in mine and src.endswith(".png") else src

        return page(markdown, f"Study {self.study}", lambda t: href(t) if t in mine else t, image, script)

    def mlflow_copies(self, run_id: str, folder: str) -> dict[str, str]:
        """report.md and report.html as logged to ``run_id``'s artifacts under ``folder``: every link to a
        file beside the report goes through the server's get-artifact route, and report.md, whose
        figures MLflow's Markdown view cannot draw, links each figure and points to report.html."""
        link, mine = artifact_link(run_id, folder), {p.name for p in self._files} | {"report.html"}

        def relink(m: re.Match) -> str:
            bang, text, target = m.groups()
            if target not in mine:
                return m.group(0)
            return f"[Figure: {target}]({link(target)})" if bang else f"[{text}]({link(target)})"

        title, _, rest = LINK.sub(relink, self.markdown).partition("\n")
        _, _, text = self.markdown.partition("\n")
        note = (f"> MLflow's Markdown view draws no figures: `report.html` beside this file (`{folder}/report.html` "
                "in the run's artifacts) has them, with the same text.")
        html_note = (f"> Files linked here are this run's artifacts under `{folder}/`; MLflow shows this page in a "
                     "sandboxed frame, which may not open links: pick a file in the artifact tree instead.")
        return {"report.md": f"{title}\n\n{note}\n{rest}",
                "report.html": self.render_html(f"{title}\n\n{html_note}\n{text}", link, RESOLVE)}
