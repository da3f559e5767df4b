"""MkDocs hooks: the home page is the README; the executed tutorials show figures, not progress bars.

One source for the front page: docs/index.md only holds a pointer, and `on_page_markdown`
replaces it with README.md (links into docs/ made site-relative) when the site is built.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def on_config(config):  # noqa: ANN001, ANN201 - MkDocs API
    # The tutorials run in kernels that inherit this environment: figures inline even where
    # MPLBACKEND=Agg is set (CI), no tqdm bars (they would be stderr blocks on the pages), and
    # no warning that ipywidgets (notebook bars) is missing.
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore:IProgress not found")
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs API
    if page.file.src_uri != "index.md":
        return markdown
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"\]\(docs/\)", "](index.md)", text)
    return re.sub(r"\]\(docs/", "](", text)
