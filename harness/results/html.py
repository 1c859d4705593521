"""report.html: report.md as one self-contained page (``harness report --html``): the markdown rendered by
markdown-it-py (CommonMark with tables), every plot embedded as a data: URI, a small stylesheet inline, no
external reference, so the file can be mailed or attached as it is."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .. import store as _store

STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#111}
table{border-collapse:collapse;margin:1em 0;font-size:12px}th,td{border:1px solid #bbb;padding:3px 6px}
th{background:#eee}tr:nth-child(even){background:#f7f7f7}img{max-width:100%}code{background:#f2f2f2;padding:0 3px}
h1,h2,h3{margin-top:1.4em}"""


def _embed(match: re.Match, folder: Path) -> str:
    src = html.unescape(match.group(2))
    path = folder / src
    if re.match(r"^[a-z]+:", src) or not path.is_file():
        return match.group(0)
    data = base64.b64encode(path.read_bytes()).decode()
    mime = {"png": "image/png", "svg": "image/svg+xml", "jpg": "image/jpeg"}.get(path.suffix[1:], "image/png")
    return f'{match.group(1)}data:{mime};base64,{data}{match.group(3)}'


def write_html(report: str | Path) -> Path:
    """Render ``report`` (a report.md) into report.html beside it; returns its path."""
    from markdown_it import MarkdownIt
    report = Path(report)
    body = MarkdownIt("commonmark").enable("table").render(report.read_text())
    body = re.sub(r'(<img [^>]*src=")([^"]+)(")', lambda m: _embed(m, report.parent), body)
    title = next((line[2:] for line in report.read_text().splitlines() if line.startswith("# ")), "Results")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")
    out = report.with_suffix(".html")
    _store.write_text_atomic(out, page)
    return out
