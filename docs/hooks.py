"""MkDocs hook: the site's home page is the README, with its links into docs/ made site-relative.

One source for the front page: docs/index.md only holds a pointer, and this hook replaces it
with README.md when the site is built.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs API
    if page.file.src_uri != "index.md":
        return markdown
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"\]\(docs/\)", "](index.md)", text)
    return re.sub(r"\]\(docs/", "](", text)
