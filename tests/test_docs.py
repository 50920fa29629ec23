"""The documentation: README as a landing page, the MkDocs site, its links, the spec reference.

- the site builds with ``mkdocs build --strict`` (no broken link or anchor, no page left out of
  the nav unless mkdocs.yml says so); skipped only when MkDocs is not installed (the ``docs``
  extra, which the ``test`` extra includes);
- every relative link in README.md and docs/**/*.md points at a file that exists, and every
  ``#anchor`` at a heading that both GitHub and MkDocs give that id, so the pages work in both;
- docs/spec-reference.md is what ``docs/gen_spec_reference.py`` generates from the spec models
  (after a change to the spec: ``python docs/gen_spec_reference.py``);
- README.md stays a landing page: ≤ 15,000 bytes, the set-up commands in its first 40 lines,
  the evidence markers the evidence command fills.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gen = _load("klstudy_gen_spec_reference", DOCS / "gen_spec_reference.py")
hooks = _load("klstudy_mkdocs_hooks", DOCS / "mkdocs_hooks.py")


# --- a link checker for GitHub and MkDocs at once -------------------------------------------
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
_HTML_ID = re.compile(r"<[^>]+\b(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_ATTR_ID = re.compile(r"\{[^}]*#([\w-]+)[^}]*\}\s*$", re.MULTILINE)


def _without_code(text: str) -> str:
    """Fenced blocks and inline code blanked out (line numbers kept)."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return _INLINE_CODE.sub("", text)


def _heading_text(raw: str) -> str:
    """What a heading reads as: links → their text, code and emphasis marks dropped."""
    raw = _ATTR_ID.sub("", raw)
    raw = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    raw = re.sub(r"<[^>]+>", "", raw)
    return raw.replace("`", "").replace("**", "").replace("__", "").strip()


def github_slug(text: str) -> str:
    """GitHub's heading id: lower case, punctuation dropped, each space a hyphen."""
    text = text.lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify (MkDocs' default heading id)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> tuple[set[str], set[str]]:
    """(GitHub ids, MkDocs ids) of a Markdown file's headings and explicit ids."""
    text = path.read_text(encoding="utf-8")
    plain = _FENCE.sub("", text)
    explicit = set(_HTML_ID.findall(plain))
    gh, mk = set(explicit), set(explicit)
    seen_gh: dict[str, int] = {}
    seen_mk: dict[str, int] = {}
    for _, raw in _HEADING.findall(plain):
        explicit_id = _ATTR_ID.search(raw)
        title = _heading_text(raw)
        for slug, seen, ids, sep in ((github_slug(title), seen_gh, gh, "-"),
                                     (mkdocs_slug(title), seen_mk, mk, "_")):
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            ids.add(slug if n == 0 else f"{slug}{sep}{n}")
        if explicit_id:
            mk.add(explicit_id.group(1))
    return gh, mk


def broken_links(files: list[Path], root: Path) -> list[str]:
    """One line per relative link that points nowhere (file, or anchor on GitHub or MkDocs)."""
    problems = []
    for file in files:
        text = _without_code(file.read_text(encoding="utf-8"))
        targets = [(m.start(), m.group(1)) for m in _LINK.finditer(text)]
        targets += [(m.start(), m.group(1)) for m in _REF_DEF.finditer(text)]
        targets += [(m.start(), m.group(1)) for m in _HTML_LINK.finditer(text)]
        for pos, target in sorted(targets):
            where = f"{file.relative_to(root)}:{text.count(chr(10), 0, pos) + 1}"
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            if target.startswith("/"):
                problems.append(f"{where}: absolute link {target!r} (works nowhere but one host)")
                continue
            path_part, _, anchor = target.partition("#")
            dest = (file.parent / path_part).resolve() if path_part else file
            try:
                dest.relative_to(root)
            except ValueError:
                problems.append(f"{where}: {target!r} leaves the repository")
                continue
            if not dest.exists():
                problems.append(f"{where}: {target!r}: no such file")
                continue
            if anchor and dest.suffix == ".md":
                gh, mk = anchors(dest)
                missing = [name for name, ids in (("GitHub", gh), ("MkDocs", mk))
                           if anchor not in ids]
                if missing:
                    problems.append(f"{where}: {target!r}: no heading with id #{anchor} on "
                                    f"{' and '.join(missing)}")
    return problems


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def test_every_relative_link_in_readme_and_docs_points_somewhere():
    files = _doc_files()
    assert len(files) > 10, files  # README and the site's pages were found
    problems = broken_links(files, ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


def _md_links(file: Path) -> list[Path]:
    """The Markdown files a file links to (existing ones)."""
    text = _without_code(file.read_text(encoding="utf-8"))
    out = []
    for m in [*_LINK.finditer(text), *_REF_DEF.finditer(text), *_HTML_LINK.finditer(text)]:
        path = m.group(1).partition("#")[0]
        if path and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path):
            dest = (file.parent / path).resolve()
            if dest.suffix == ".md" and dest.is_file():
                out.append(dest)
    return out


def unreachable_pages(nav_pages: list[Path], docs: Path) -> list[str]:
    """Pages under ``docs`` that no chain of links from a nav page reaches (orphans)."""
    seen: set[Path] = set()
    todo = [p.resolve() for p in nav_pages]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        todo.extend(_md_links(page))
    return sorted(str(p.relative_to(docs)) for p in docs.rglob("*.md") if p.resolve() not in seen)


def _nav_pages() -> list[Path]:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages: list[Path] = []

    def walk(node):
        if isinstance(node, str):
            pages.append(DOCS / node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(config["nav"])
    return pages


def test_every_page_is_in_the_nav_or_linked_from_it():
    nav = _nav_pages()
    assert len(nav) >= 11 and all(p.is_file() for p in nav), nav
    orphans = unreachable_pages(nav, DOCS)
    assert not orphans, f"pages no nav page leads to: {orphans}"


def test_orphan_check_finds_unlinked_pages(tmp_path):
    (tmp_path / "index.md").write_text("[a](sub/a.md)\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("[b](b.md) `[c](c.md)`\n")
    (tmp_path / "sub" / "b.md").write_text("back to [index](../index.md)\n")
    (tmp_path / "sub" / "c.md").write_text("only named in code\n")
    assert unreachable_pages([tmp_path / "index.md"], tmp_path) == ["sub/c.md"]


def test_link_checker_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## Running on a cluster\n\n## What must be shared, and why\n\n"
        "## The M × R grid\n\n<a id=\"kept\"></a>\n```\n## not a heading\n```\n")
    (tmp_path / "README.md").write_text(textwrap.dedent("""\
        [ok](docs/page.md) [ok](docs/page.md#running-on-a-cluster) ![ok](docs/page.md)
        [ok](docs/page.md#what-must-be-shared-and-why) [ok](docs/page.md#kept)
        [ok](https://example.org/nowhere.md) `[not a link](nowhere.md)`
        [gone](docs/missing.md)
        [bad anchor](docs/page.md#running)
        [github only](docs/page.md#the-m--r-grid)
        [code](docs/page.md#not-a-heading)
        [up](../outside.md) [abs](/docs/page.md)
        [ref]: docs/also-missing.md
        """))
    problems = broken_links([tmp_path / "README.md"], tmp_path)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    for needle in ("docs/missing.md", "#running'", "#the-m--r-grid", "#not-a-heading",
                   "leaves the repository", "absolute link", "docs/also-missing.md"):
        assert needle in text, (needle, text)
    assert "on MkDocs" in text and "no heading with id #running on GitHub and MkDocs" in text


def test_slugs_match_github_and_mkdocs():
    assert github_slug("Study driver (python bench/orchestration.py)") == \
        "study-driver-python-benchorchestrationpy"
    assert mkdocs_slug("Study driver (python bench/orchestration.py)") == \
        "study-driver-python-benchorchestrationpy"
    assert github_slug("The M × R grid") == "the-m--r-grid"
    assert mkdocs_slug("The M × R grid") == "the-m-r-grid"
    markdown_toc = pytest.importorskip("markdown.extensions.toc")
    for title in ("The M × R grid", "Evidence: does the paper's effect hold here?",
                  "Bare ray start", "Ça va — β_max"):
        assert mkdocs_slug(title) == markdown_toc.slugify(title, "-")


# --- the MkDocs site ---------------------------------------------------------------------------
def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]' (the test extra "
                        "includes it)")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # every nav page was built, and the spec reference holds the generated table
    for page in ("index.html", "spec-reference/index.html", "cluster/index.html",
                 "reliability/index.html", "gpu/index.html", "report/index.html",
                 "evidence/index.html", "benchmarks/index.html", "architecture/index.html",
                 "custom-vae/index.html", "racing/index.html",
                 "quickstart/report.html", "results/paper_toy/index.html"):
        assert (site / page).is_file(), (page, output)
    assert "train.total_steps" in (site / "spec-reference" / "index.html").read_text()
    # the hook turned links to repository files outside docs/ into their paths
    assert "<code>bench/results/pruning.md</code>" in (
        site / "benchmarks" / "index.html").read_text()


def test_hook_keeps_repository_links_and_flags_missing_ones(tmp_path, caplog):
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "x.md").write_text("x")
    md = ("[details](../bench/x.md) [`bench/x.md`](../bench/x.md) [in](page.md) "
          "`[code](../nowhere.md)` [gone](../bench/y.md)")
    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.repo_links"):
        out = hooks.rewrite_markdown(md, "", tmp_path, tmp_path / "docs", None, "p.md")
    assert "details (`bench/x.md`)" in out and " `bench/x.md` " in out
    assert "[in](page.md)" in out
    assert [r.getMessage() for r in caplog.records] == [
        "Doc file 'p.md' links to '../bench/y.md', but the repository has no 'bench/y.md'"]
    out = hooks.rewrite_markdown("[d](../bench/x.md#a)", "", tmp_path, tmp_path / "docs",
                         "https://github.com/o/r/", "p.md")
    assert out == "[d](https://github.com/o/r/blob/main/bench/x.md#a)"


# --- the spec reference --------------------------------------------------------------------
@functools.cache
def _generated_spec_reference() -> str:
    return gen.render()


def test_spec_reference_page_is_generated_from_the_spec():
    committed = (DOCS / "spec-reference.md").read_text(encoding="utf-8")
    generated = _generated_spec_reference()
    assert committed == generated, (
        "docs/spec-reference.md is stale: run `python docs/gen_spec_reference.py` and commit it")


def test_spec_reference_names_every_key_of_every_section():
    from study._spec import StudySpec

    page = _generated_spec_reference()
    keys = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            dotted = f"{prefix}{field.alias or name}"
            keys.append(dotted)
            sub = gen._section_model(field.annotation)
            if sub is not None:
                walk(sub, dotted + ".")

    walk(StudySpec, "")
    assert len(keys) > 40
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert not missing, missing


def _inclusive(lo: float, hi: float):
    def check(x: float) -> float:
        if x < lo or x > hi:
            raise ValueError(f"must be in [{lo}, {hi}]")
        return x

    return AfterValidator(check)


def _no_dupes(values: tuple[int, ...]) -> tuple[int, ...]:
    if len(set(values)) != len(values):
        raise ValueError("duplicate value")
    return values


class _Inner(BaseModel):
    """The inner section."""

    model_config = ConfigDict(extra="forbid")

    # how many
    count: Annotated[int, Field(ge=1)] = 3  # at least one
    share: Annotated[float, _inclusive(0, 1)] = 0.5
    mode: str | None = Field(None, description="Given by Field.")

    @model_validator(mode="after")
    def _count_small(self):
        limit = 10
        if self.count > limit:
            message = f"must be <= {limit}"
            raise ValueError(message, self.count)
        return self


class _Outer(BaseModel):
    """A whole fake spec."""

    name: str
    values: Annotated[tuple[int, ...], Field(min_length=1), AfterValidator(_no_dupes)] = (1,)
    inner: _Inner = Field(default_factory=_Inner)


def test_spec_reference_renders_types_defaults_rules_and_comments():
    page = gen.render(_Outer, header="# T\n", descriptions={"name": "Written in the docs."})
    rows = {line.split("|")[1].strip(): line for line in page.splitlines()
            if line.startswith("| `")}
    assert set(rows) == {"`name`", "`values`", "`inner`", "`inner.count`", "`inner.share`",
                         "`inner.mode`"}
    assert "**required**" in rows["`name`"] and "| str |" in rows["`name`"]
    assert "`[1]`" in rows["`values`"] and "non-empty" in rows["`values`"]
    assert '"duplicate value"' in rows["`values`"]
    assert "(all defaults)" in rows["`inner`"] and "(#inner)" in rows["`inner`"]
    count = rows["`inner.count`"]
    assert "`3`" in count and "≥ 1" in count
    across = page[page.index("## inner"):]
    assert 'Checked across keys:\n\n- "must be <= …"' in across  # a rule without a key
    assert "| in [0, 1] |" in rows["`inner.share`"]  # read from the validator's closure
    assert "Given by Field." in rows["`inner.mode`"] and "str or null" in rows["`inner.mode`"]
    assert "The inner section." in page and "## inner" in page
    assert "Written in the docs." in rows["`name`"]
    assert "how many at least one." in rows["`inner.count`"]  # the comments, as a sentence
    with pytest.raises(KeyError, match="inner.gone"):  # a description of a key that went away
        gen.render(_Outer, header="# T\n", descriptions={"inner.gone": "stale"})


# --- README as a landing page ----------------------------------------------------------------
def test_readme_is_a_landing_page():
    raw = README.read_bytes()
    assert len(raw) <= 15_000, f"README.md is {len(raw):,} bytes (at most 15,000)"
    first = raw.decode("utf-8").splitlines()[:40]
    head = "\n".join(first)
    assert "klstudy run examples/quickstart.yaml" in head, "quickstart not in the first 40 lines"
    assert "pip install -e '.[test,ptb]' && python -m pytest -q" in head, (
        "the test command (CI's) is not in the first 40 lines")
    text = raw.decode("utf-8")
    # the headline numbers are written by `python -m analysis.evidence` (its --check runs in
    # tests/analysis/test_evidence.py), never typed
    for block in ("quickstart-headline", "paper_toy-headline"):
        begin, end = f"<!-- evidence:begin {block} -->", f"<!-- evidence:end {block} -->"
        assert text.count(begin) == 1 and text.count(end) == 1, block
        assert text.index(begin) < text.index(end), block
    assert re.search(r"!\[[^\]]+\]\(docs/[^)]+\.png\)", text), "no picture"
