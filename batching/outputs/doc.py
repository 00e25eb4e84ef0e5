"""The report as a document, and the data every section of it reads.

A Doc holds blocks that render both as Markdown and as HTML. ReportData is what each section
reads. batching.outputs.report lists the sections.
"""

import base64
import dataclasses
import html
import os
from typing import Any

from batching.outputs import archive
from batching.text import fmt


@dataclasses.dataclass
class ReportData:
    """What the report is written from.

    - `summaries` and `rows`: the experiment's run summaries and rows.
    - `plot_paths`: the saved figures' PNG files, by figure name.
    - `archived`: the committed sweeps of other machines.
    - `verdicts`: the claims' verdicts, by claim id, once judged.
    """

    workdir: str
    experiment: str
    claim_ids: tuple[str, ...]
    summaries: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    plot_paths: dict[str, str]
    archived: list[archive.Archived]
    verdicts: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    @property
    def analyzed(self) -> list[dict[str, Any]]:
        """The summaries of runs the roofline analysed."""
        return [s for s in self.summaries if "knee_batch_size" in s]


class Doc:
    """Blocks rendered both as Markdown and as HTML."""

    def __init__(self):
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, text: str, level: int = 2):
        """A heading of `level` (1 the title)."""
        self.blocks.append(("h", (level, text)))

    def para(self, text: str):
        """A paragraph."""
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]]):
        """A table; each cell written by batching.text.fmt."""
        self.blocks.append(("table", (header, [[fmt(c) for c in row] for row in rows])))

    def image(self, path: str, caption: str):
        """A figure: linked in Markdown, embedded in HTML."""
        self.blocks.append(("img", (path, caption)))

    def markdown(self, root: str) -> str:
        """The document as Markdown, images relative to `root`."""
        out = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "table":
                header, rows = v
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out.extend("| " + " | ".join(row) + " |" for row in rows)
            else:
                out.append(f"![{v[1]}]({os.path.relpath(v[0], root)})")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        """The document as one HTML page with its images embedded (it opens offline)."""
        out = [
            "<!doctype html><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
            "img{max-width:100%}</style>",
        ]
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h{v[0]}>{html.escape(v[1])}</h{v[0]}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(v)}</p>")
            elif kind == "table":
                header, rows = v
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header))
                for row in rows:
                    out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row))
                out.append("</table>")
            else:
                with open(v[0], "rb") as f:
                    data = base64.b64encode(f.read()).decode()
                out.append(
                    f"<figure><img src='data:image/png;base64,{data}'>"
                    f"<figcaption>{html.escape(v[1])}</figcaption></figure>"
                )
        return "\n".join(out)
