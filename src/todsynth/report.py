"""Markdown + HTML reports from a results dict (tables of mIoU / per-class IoU, figures beside them)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path


def fmt(x: float | None, digits: int = 3) -> str:
    """A metric for a table; NaN/None as an en dash."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def metrics_table(rows: dict[str, dict], class_names: Sequence[str]) -> list[list[str]]:
    """Header + one row per method: mIoU, OA, mAcc, then per-class IoU (from metrics dicts)."""
    header = ["method", "mIoU", "OA", "mAcc", *class_names]
    body = [
        [name, fmt(m["mIoU"]), fmt(m["OA"]), fmt(m["mAcc"]), *(fmt(m["IoU"].get(c)) for c in class_names)]
        for name, m in rows.items()
    ]
    return [header, *body]


def markdown_table(table: list[list[str]]) -> str:
    head, *body = table
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def html_table(table: list[list[str]]) -> str:
    head, *body = table
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>"


def write_report(folder: str | Path, title: str, sections: list[tuple[str, str | list[list[str]] | Path]]) -> None:
    """report.md and report.html from sections: (heading, paragraph text | table | image path)."""
    from todsynth.io import write_text

    folder = Path(folder)
    md, body = [f"# {title}", ""], [f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        if heading:
            md += [f"## {heading}", ""]
            body.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, Path):
            rel = content.relative_to(folder).as_posix() if content.is_relative_to(folder) else str(content)
            md += [f"![{heading}]({rel})", ""]
            body.append(f'<img src="{html.escape(rel)}" alt="{html.escape(heading)}">')
        elif isinstance(content, list):
            md += [markdown_table(content), ""]
            body.append(html_table(content))
        else:
            md += [content, ""]
            body.append("".join(f"<p>{html.escape(p)}</p>" for p in content.split("\n\n")))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}img{max-width:100%}"
    )
    write_text(folder / "report.md", "\n".join(md) + "\n")
    write_text(
        folder / "report.html",
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n",
    )
