"""Markdown and HTML rendering helpers: tables, one-line cells, inlined PNGs, a self-contained page."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path


def one_line(s: object, limit: int = 300) -> str:
    """Whitespace collapsed to single spaces, cut at limit characters (with " …")."""
    text = " ".join(str(s).split())
    return text if len(text) <= limit else text[:limit] + " …"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Lines of a Markdown table (cells as given, converted with str)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, table_id: str | None = None,
               css_class: str | None = None) -> str:
    """An HTML table with every cell escaped."""
    e = html.escape
    attrs = (f" id='{e(table_id)}'" if table_id else "") + (f" class='{e(css_class)}'" if css_class else "")
    head = "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{attrs}>{head}{body}</table>"


def img_figure(path: str | Path, alt: str) -> str:
    """A <figure> with the PNG inlined as base64 (the page stays one self-contained file)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


def html_page(title: str, body: Sequence[str], css: str = "", lang: str = "zh") -> str:
    """A complete UTF-8 HTML document around body parts."""
    head = (f"<!DOCTYPE html><html lang='{lang}'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>")
    return "\n".join([head, *body, "</body></html>"])
