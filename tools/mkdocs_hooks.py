"""MkDocs hook (``hooks:`` in mkdocs.yml): pages whose source lives outside ``docs/``.

The repository's README.md is the site's home page and ``jobs/README.md`` its page on the
SLURM job scripts. Both stay where readers of the repository expect them (one copy, no
duplicate under docs/); this hook adds them to the site at build time.

Every page's relative links are written from the repository's point of view, so that they
work when the file is read on GitHub or in a checkout: the README links ``docs/wasap.md``
and ``jobs/README.md``, a page of docs/ links ``../README.md#quickstart`` and
``../jobs/README.md``. The hook rewrites them into links between site pages (``wasap.md``,
``jobs.md``, ``index.md#quickstart``). A link to a file that is in neither place (say
``../tools/reproduce.py``) is left as it is, so that ``mkdocs build --strict`` reports it.

Nothing here touches the network; it only reads files of the checkout.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

# repository path -> page in the site
REPO_PAGES = {"README.md": "index.md", "jobs/README.md": "jobs.md"}

# [text](target) and ![alt](target); the target ends at whitespace or ")"
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)")
_EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|#|/)", re.IGNORECASE)


def _repo_root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files: Files, config: Any) -> Files:
    """Add the pages of :data:`REPO_PAGES` (their text is read from the checkout)."""
    root = _repo_root(config)
    for src, uri in REPO_PAGES.items():
        files.append(File.generated(config, uri, abs_src_path=str(root / src)))
    return files


def site_target(repo_path: str, docs_dir: Path, repo_root: Path) -> str | None:
    """The site page or file (path under docs_dir) for a repository path, or None if the
    site has no such page. A folder of docs/ maps to its index.md."""
    if repo_path in REPO_PAGES:
        return REPO_PAGES[repo_path]
    docs_rel = posixpath.relpath(repo_path, docs_dir.relative_to(repo_root).as_posix())
    if docs_rel.startswith(".."):
        return None
    if (docs_dir / docs_rel).is_dir():
        return posixpath.join(docs_rel, "index.md")
    return docs_rel


def rewrite_links(markdown: str, repo_source: str, page_uri: str, docs_dir: Path, repo_root: Path) -> str:
    """Rewrite the relative links of a page written at ``repo_source`` (a repository path)
    so that they work from ``page_uri`` (its path in the site)."""

    def fix(m: re.Match[str]) -> str:
        target = m.group(2)
        if _EXTERNAL.match(target):
            return m.group(0)
        path, hash_, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(repo_source), path))
        site = site_target(repo_path, docs_dir, repo_root)
        if site is None:
            return m.group(0)
        rel = posixpath.relpath(site, posixpath.dirname(page_uri) or ".")
        return f"{m.group(1)}{rel}{hash_}{anchor}"

    return _LINK.sub(fix, markdown)


def repo_source(page_uri: str, docs_dir: Path, repo_root: Path) -> str:
    """The repository path of the file behind a site page: README.md for index.md,
    docs/running.md for running.md."""
    sources = {uri: src for src, uri in REPO_PAGES.items()}
    if page_uri in sources:
        return sources[page_uri]
    return posixpath.join(docs_dir.relative_to(repo_root).as_posix(), page_uri)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    docs_dir, root = Path(config["docs_dir"]).resolve(), _repo_root(config)
    uri = page.file.src_uri
    return rewrite_links(markdown, repo_source(uri, docs_dir, root), uri, docs_dir, root)
