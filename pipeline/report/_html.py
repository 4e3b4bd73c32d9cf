"""`report.html`: the study's `report.md` as one self-contained HTML page.

MLflow's artifact viewer shows a Markdown file as text (its `![..](plot.png)` links stay links),
but renders an HTML artifact as a page. This file needs nothing beside it: the Markdown is rendered
with markdown-it-py (CommonMark plus GitHub's pipe tables) and every image the report links to
in its own folder is embedded as a base64 `data:` URI. `report.md` stays the repository's copy.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px;
       line-height: 1.5; color: #1f2328; max-width: 1100px; margin: 0 auto; padding: 16px 24px; }
h1 { font-size: 1.8em; border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; }
h2 { font-size: 1.35em; border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0 16px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d1d9e0; padding: 4px 10px; text-align: left; font-variant-numeric: tabular-nums; }
tr:nth-child(2n) td { background: #f6f8fa; }
code { background: #eff1f3; padding: .1em .35em; border-radius: 4px; font-size: 90%; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0 16px; }
"""


def embed_images(tokens: list[Token], folder: Path) -> list[str]:
    """Replace the `src` of every image token whose file lies in `folder` by a base64 data URI,
    in place; returns the sources left as they were (not a file in `folder`)."""
    missing = []
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            path = folder / src
            if "/" in src or "\\" in src or not src or not path.is_file():
                missing.append(src)
                continue
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            child.attrSet("src", f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}")
    return missing


def render(markdown: str, folder: Path, title: str) -> str:
    """One HTML document (UTF-8) from `markdown`, images from `folder` embedded."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    env: dict = {}
    tokens = md.parse(markdown, env)
    embed_images(tokens, folder)
    body = md.renderer.render(tokens, md.options, env)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def write_html(markdown_path: Path) -> Path:
    """Write `report.html` beside `markdown_path` (its images embedded) and return its path.

    Raises:
        OSError: the Markdown cannot be read or the HTML cannot be written.
    """
    text = markdown_path.read_text(encoding="utf-8")
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), markdown_path.stem)
    path = markdown_path.with_suffix(".html")
    path.write_text(render(text, markdown_path.parent, title), encoding="utf-8")
    return path
