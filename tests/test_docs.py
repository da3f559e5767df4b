"""The docs site builds in strict mode, its tutorials run, and the repository is self-contained.

`mkdocs build --strict` fails on a broken link, a missing page or anchor, an API reference that
does not resolve, and a tutorial notebook that raises (mkdocs-jupyter executes them during the
build), so this one build checks the pages, the API reference and the tutorials together.
The tests that need the built site are the `docs` tier (``python -m pytest -m docs``, about a
minute and a half); the rest run by default.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The docs built strictly into a temporary directory (notebooks executed)."""
    out = tmp_path_factory.mktemp("site")
    env = {
        **os.environ,
        # the notebooks' kernels import this checkout's qktrace and studies
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_MKDOCS_2_WARNING": "1",
    }
    env.pop("NDIF_API_KEY", None)  # the NDIF tutorial's remote=True cell runs only with a key
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out


@pytest.mark.docs
def test_every_page_is_built(site):
    for page in (ROOT / "docs").rglob("*.md"):
        relative = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / (relative.parent if relative.name == "index" else relative) / "index.html"
        assert built.is_file(), f"{page} was not built (is it in mkdocs.yml's nav?)"


@pytest.mark.docs
def test_api_reference_renders_every_verb(site):
    import qktrace

    html = (site / "api" / "verbs" / "index.html").read_text()
    for verb in qktrace.__all__:
        if verb != "__version__":
            assert f'id="qktrace.{verb}"' in html, f"qktrace.{verb} is not in the API reference"
    # a parameter table rendered from a numpy-style docstring
    assert "batches_per_request" in html


@pytest.mark.docs
def test_tutorials_ran_and_show_their_outputs(site):
    figure = re.compile(r'<img[^>]+src="data:image/png;base64,')
    for notebook in NOTEBOOKS:
        html = (site / "tutorials" / notebook.stem / "index.html").read_text()
        assert "Traceback" not in html, notebook.name
        if notebook.stem != "03-on-ndif":  # the NDIF tutorial draws no figure
            assert figure.search(html), f"{notebook.name} shows no figure"
    own = (site / "tutorials" / "01-your-own-study" / "index.html").read_text()
    assert re.search(r"components above the null: \d", own)
    ndif = (site / "tutorials" / "03-on-ndif" / "index.html").read_text()
    assert "largest difference in the sums: 0.0" in ndif


@pytest.mark.docs
def test_figures_on_the_pages_exist(site):
    for page in site.rglob("index.html"):
        for src in re.findall(r'<img[^>]+src="([^"]+\.png)"', page.read_text()):
            assert (page.parent / src).resolve().is_file(), f"{page}: missing figure {src}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.name for n in NOTEBOOKS])
def test_notebooks_are_committed_without_outputs(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            assert not cell["outputs"] and cell["execution_count"] is None, (
                f"{notebook.name} cell {i} has outputs; clear them before committing "
                f"(jupyter nbconvert --clear-output --inplace {notebook.relative_to(ROOT)})"
            )


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", readme)
    assert links, "the README links into the docs"
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_repository_is_self_contained():
    """No page, README or docstring sends the reader to design notes outside the repository."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    files += [p for d in ("qktrace", "studies", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    for path in files:
        for name in ("DESIGN.md", "METHOD.md"):
            assert name not in path.read_text(), f"{path.relative_to(ROOT)} cites {name}"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)


def test_guide_examples_run_as_written():
    """The capture-and-reduce page's examples, then decompose's first, run on the organism."""
    import linecache

    code = "\n".join([*python_blocks("guide/capture.md"), python_blocks("guide/decompose.md")[0]])
    name = "docs/guide examples"
    # nnsight reads a trace's body back from its source: give the examples one, as a file has
    linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)
    scope: dict = {}
    exec(compile(code, name, "exec"), scope)
    assert scope["sums"]["qk_sum"].dims == ("head", "feature", "contrast", "dq", "dk")
    assert int(scope["sub"]["rank"].sel(head="2.1", feature="fruit")) >= 1
