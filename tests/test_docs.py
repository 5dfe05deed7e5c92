"""The README and docs/: every relative link points at a file of the repository and every
``#anchor`` into a Markdown file at one of its headings (GitHub's slugs), so moving a section
from one page to another cannot leave a dead link behind; the README's Python example runs."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)  # fenced blocks and inline code hold no links


def _links(page: Path) -> list[str]:
    text = CODE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#+\s+(.+)$", text, flags=re.MULTILINE)}


def test_the_pages_have_links_to_check():
    assert len(PAGES) > 5
    assert len(_links(ROOT / "README.md")) > 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    dead = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            dead.append(f"{target}: no heading with anchor #{anchor}")
    assert not dead, f"dead links in {page.relative_to(ROOT)}: " + "; ".join(dead)


def test_slugs_follow_github():
    assert _slug("Session 9: a caching CPU allocator") == "session-9-a-caching-cpu-allocator"
    assert _slug("When to use `LSH` attention?") == "when-to-use-lsh-attention"
    assert _slug("Differences from reformer_pytorch") == "differences-from-reformer_pytorch"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_python_example_runs_scaled_down(tmp_path, monkeypatch):
    """The README's example as written, with only the width and depth shrunk for a CPU test."""
    (example,) = _python_blocks(ROOT / "README.md")
    small = example.replace("dim=512", "dim=32").replace("depth=6", "depth=2")
    assert small.count("dim=32") == 1 and small.count("depth=2") == 1  # the example still has both
    monkeypatch.chdir(tmp_path)  # it saves "my-model"
    scope: dict = {}
    exec(compile(small, "README.md", "exec"), scope)
    assert scope["loss"].ndim == 0 and torch.isfinite(scope["loss"])
    assert scope["new"].shape == (1, 200)
    assert scope["x"].shape == (1, 5000)
    reloaded = type(scope["model"]).from_pretrained("my-model")
    assert reloaded.config == scope["model"].config
