"""MkDocs hook: links from a page to repository files outside ``docs/``.

The pages are written for GitHub first, where ``[details](../bench/results/pruning.md)`` from
``docs/benchmarks.md`` opens the file. MkDocs only knows the files under ``docs/`` and would
report such a link as broken. This hook checks that the target exists in the repository and then
rewrites the link for the site: to ``{repo_url}/blob/main/<path>`` when ``repo_url`` is set in
mkdocs.yml, otherwise to the link text followed by the repository path in code (the site is built
offline and has no copy of those files). A target that does not exist is a warning, which
``mkdocs build --strict`` turns into a failure.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")

# Fenced blocks and code spans (left alone), or [text](target) / ![alt](target), whichever
# starts first: a link whose text is code is a link, a link inside code is code.
_TOKEN = re.compile(r"(?P<code>```.*?```|`[^`\n]*`)|(!?)\[([^\]]*)\]\(([^)\s]+)\)", re.DOTALL)


def _rewrite(segment: str, page_dir: str, root: Path, docs: Path, repo_url: str | None,
             page: str) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group("code"):
            return match.group(0)
        bang, text, target = match.group(2, 3, 4)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(page_dir, path))
        if not resolved.startswith("../"):
            return match.group(0)  # inside docs/: MkDocs validates it
        repo_path = (docs / resolved).resolve()
        try:
            rel = repo_path.relative_to(root).as_posix()
        except ValueError:
            log.warning("Doc file '%s' links to '%s', outside the repository", page, target)
            return match.group(0)
        if not repo_path.exists():
            log.warning("Doc file '%s' links to '%s', but the repository has no '%s'",
                        page, target, rel)
            return match.group(0)
        if repo_url:
            url = f"{repo_url.rstrip('/')}/blob/main/{rel}" + (f"#{anchor}" if anchor else "")
            return f"{bang}[{text}]({url})"
        if bang:
            log.warning("Doc file '%s' shows the image '%s' from outside docs/", page, target)
            return match.group(0)
        if text.strip("`") == rel:
            return f"`{rel}`"
        return f"{text} (`{rel}`)"

    return _TOKEN.sub(one, segment)


def rewrite_markdown(markdown: str, page_dir: str, root: Path, docs: Path,
                     repo_url: str | None, page: str) -> str:
    """``markdown`` with its links to repository files outside ``docs/`` rewritten (code spans
    and fenced blocks left alone)."""
    return _rewrite(markdown, page_dir, root, docs, repo_url, page)


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - the MkDocs hook signature
    return rewrite_markdown(markdown, posixpath.dirname(page.file.src_uri),
                            Path(config["config_file_path"]).resolve().parent,
                            Path(config["docs_dir"]).resolve(), config.get("repo_url"),
                            page.file.src_uri)
