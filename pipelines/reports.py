"""Small Markdown/HTML renderers for the reports the Kubeflow UI shows beside each step.

The KFP UI renders an ``Output[Markdown]`` or ``Output[HTML]`` artifact inline, so tables are
plain Markdown/HTML and figures are embedded as base64 PNG (the UI cannot follow file links).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Iterable, Sequence


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; ``|`` inside cells is escaped."""
    def fmt(values: Sequence[Any]) -> str:
        return "| " + " | ".join(_cell(v).replace("|", "\\|") for v in values) + " |"

    lines = [fmt(header), "| " + " | ".join("---" for _ in header) + " |"]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table with escaped cells."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r) + "</tr>" for r in rows
    )
    return f"<table border=\"1\" cellpadding=\"4\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_data_uri(path: str | os.PathLike) -> str:
    """``data:image/png;base64,...`` for an image file, so the page needs no other file."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def html_page(title: str, parts: Sequence[str]) -> str:
    """A self-contained HTML page holding the given HTML fragments."""
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title></head>\n<body>\n<h2>{html.escape(title)}</h2>\n"
        f"{body}\n</body></html>\n"
    )


def html_image(path: str | os.PathLike, alt: str) -> str:
    """An ``<img>`` holding the PNG inline."""
    return f"<img alt=\"{html.escape(alt)}\" src=\"{png_data_uri(path)}\" style=\"max-width:100%\">"
