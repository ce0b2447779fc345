"""The documentation site: generated pages match the code, the site builds with
``mkdocs build --strict`` without the network, and the Python API examples really run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_sparse.runtime.launcher import find_mpiexec
from hpc_sparse.cli import _parser, main
from hpc_sparse.config import describe
from hpc_sparse.reference import REGENERATE, cli_reference_markdown, config_reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_match_the_code():
    stale = _load_tool("gen_reference_docs").stale_pages()
    assert not stale, (f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} differ from what the code "
                       f"generates; fix: run `{REGENERATE}` and commit the result")


def test_config_reference_has_every_key():
    page = config_reference_markdown()
    for key, default, text in describe():
        row = next(line for line in page.splitlines() if f'<a id="{key}"></a>' in line)
        assert f"`{default}`" in row and row.count(" | ") == 4, row
    assert "| `data.name`" not in page  # the anchor comes first: every row was generated
    assert "\\|" in page  # a '|' inside a help text is escaped, so it does not split the row


def test_cli_reference_has_every_subcommand_and_option():
    parser = _parser()
    page = cli_reference_markdown(parser)
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert {"train", "evaluate", "info", "convert", "config-help"} <= set(subs)
    for name, sub in subs.items():
        section = page.split(f"## `hpc-sparse {name}`")[1].split("\n## ")[0]
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in section, (name, option)


def test_config_help_markdown_prints_the_page(capsys):
    assert main(["config-help", "--markdown"]) == 0
    assert capsys.readouterr().out == config_reference_markdown()


def test_repo_pages_links_are_rewritten_for_the_site():
    pytest.importorskip("mkdocs")
    hooks = _load_tool("mkdocs_hooks")
    docs = ROOT / "docs"
    text = ("[w](docs/wasap.md) [j](jobs/README.md#exit-status-75) ![p](docs/results/parallel.png) "
            "[r](docs/results/) [x](https://example.org/a.md) [a](#quickstart) [t](tools/reproduce.py)")
    out = hooks.rewrite_links(text, "README.md", "index.md", docs, ROOT)
    assert out == ("[w](wasap.md) [j](jobs.md#exit-status-75) ![p](results/parallel.png) "
                   "[r](results/index.md) [x](https://example.org/a.md) [a](#quickstart) [t](tools/reproduce.py)")
    assert hooks.rewrite_links("[h](../README.md#quickstart)", "jobs/README.md", "jobs.md", docs, ROOT) == \
        "[h](index.md#quickstart)"
    # a page of docs/ links the way GitHub reads it, too
    assert hooks.repo_source("running.md", docs, ROOT) == "docs/running.md"
    assert hooks.repo_source("index.md", docs, ROOT) == "README.md"
    page = "[j](../jobs/README.md#exit-status) [h](../README.md#quickstart) [w](wasap.md) [p](results/parallel.png)"
    assert hooks.rewrite_links(page, "docs/running.md", "running.md", docs, ROOT) == \
        "[j](jobs.md#exit-status) [h](index.md#quickstart) [w](wasap.md) [p](results/parallel.png)"
    assert hooks.rewrite_links("[p](../performance.md#x) [r](../../README.md)", "docs/results/index.md",
                               "results/index.md", docs, ROOT) == "[p](../performance.md#x) [r](../index.md)"


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (lower case, punctuation
    other than '-' and '_' dropped, spaces to '-')."""
    heads = re.findall(r"^#{1,6} +(.+?) *#*$", _FENCE.sub("", markdown), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _hand_written_pages() -> list[Path]:
    generated = set(_load_tool("gen_reference_docs").generated_pages())
    results = {p for p in (ROOT / "docs" / "results").glob("*.md") if p.name != "index.md"}
    return [ROOT / "README.md", ROOT / "jobs" / "README.md",
            *sorted(p for p in (ROOT / "docs").rglob("*.md") if p not in generated | results)]


@pytest.mark.parametrize("page", _hand_written_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_work_in_the_repository(page):
    """Read as files (on GitHub, in a checkout), every relative link of a hand-written page
    points to a file that exists, and a link to a heading of a Markdown file to a heading
    that exists. (The site build checks the same links after the hook rewrote them.)"""
    broken = []
    for target in _LINK.findall(_FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and not anchor.startswith("hpc_sparse."):  # API anchors: site only
            if anchor not in _github_anchors(file.read_text()):
                broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"


def test_readme_is_a_front_door():
    """The README stays short (issue 22): the topics live in docs/, and it links every page."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    nav_pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    nav_pages -= {p for p in nav_pages if p.startswith("results/") and p != "results/index.md"}
    linked = {t.partition("#")[0].removeprefix("docs/") for t in _LINK.findall(readme)}
    assert nav_pages <= linked, sorted(nav_pages - linked)
    assert "jobs/README.md" in linked
    # the Quickstart's two commands, the same on the installation page
    quickstart = readme.split("## Quickstart")[1].split("\n## ")[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quickstart)
    assert len(commands) == 2 and commands[1] == "bash tools/test_all.sh", commands
    assert commands[0].startswith("python3 -m venv .venv") and "mpiexec -n 2" in commands[0]
    installation = (ROOT / "docs" / "installation.md").read_text()
    assert all(f"```bash\n{c}\n```" in installation for c in commands)


def test_results_page_is_dated_by_the_runs_it_includes():
    """docs/results/index.md includes each study's generated table (``--8<--``, without its
    heading); its text for the study names the date and commit that tools/reproduce.py
    recorded, so rerunning the tool without revisiting the text fails here."""
    page = (ROOT / "docs" / "results" / "index.md").read_text()
    sections = re.split(r"^## ", page, flags=re.MULTILINE)
    for meta_file in sorted((ROOT / "docs" / "results").glob("*.json")):
        meta = json.loads(meta_file.read_text())
        if "study" not in meta:
            continue
        name = meta["study"]
        generated = (ROOT / "docs" / "results" / f"{name}.md").read_text().splitlines()
        assert generated[0].startswith("### ") and generated[1] == "", name  # what ":3:" skips
        section = next(s for s in sections if f'--8<-- "docs/results/{name}.md:3:"' in s)
        assert meta["date"] in section and f"`{meta['commit']}`" in section, (name, meta["date"], meta["commit"])


def test_sphinx_roles_become_optional_cross_references():
    pytest.importorskip("griffe")
    roles = _load_tool("griffe_sphinx_roles")

    class Obj:  # the part of a griffe object the extension uses
        def resolve(self, name: str) -> str:
            if name == "Config":
                return "hpc_sparse.config.Config"
            raise KeyError(name)

    out = roles.replace_roles(Obj(), "see :class:`Config`, :func:`~hpc_sparse.data.load_dataset` and :meth:`x.y`")
    assert out == ('see <autoref identifier="hpc_sparse.config.Config" optional><code>Config</code></autoref>, '
                   '<autoref identifier="hpc_sparse.data.load_dataset" optional><code>load_dataset</code></autoref> '
                   'and <autoref identifier="x.y" optional><code>x.y</code></autoref>')


def _offline_prefix() -> list[str]:
    """``unshare -n``: run in a network namespace of its own (no network at all), where the
    machine allows it (root on Linux); else nothing."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def test_site_builds_strict_and_offline(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        if os.environ.get("CI"):
            pytest.fail("mkdocs is not installed; fix: pip install -e '.[docs]' (tools/test_all.sh does)")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    proc = subprocess.run([*_offline_prefix(), sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    assert {"index.html", "jobs/index.html", "python-api/index.html", "configuration-reference/index.html",
            "cli-reference/index.html", "results/parallel/index.html"} <= pages
    assert 'id="hpc_sparse.train.Trainer"' in (site / "python-api" / "index.html").read_text()
    assert 'href="wasap/"' in (site / "index.html").read_text()  # README's docs/wasap.md link, rewritten
    # nothing the pages load comes from another host (they work offline)
    remote = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.IGNORECASE)
    loading_remote = [p for p in site.rglob("*.html") if remote.search(p.read_text())]
    assert not loading_remote, loading_remote


def _run_example(name: str, *args: str, launcher: tuple[str, ...] = ()) -> str:
    proc = subprocess.run([*launcher, sys.executable, *(["-m", "mpi4py"] if launcher else []),
                           str(ROOT / "docs" / "examples" / name), *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HPC_SPARSE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.mpi)])
def test_example_train_on_numpy_arrays(tmp_path, ranks):
    launcher = () if ranks == 1 else (find_mpiexec(), "-n", str(ranks))
    out = _run_example("train_numpy.py", str(tmp_path), launcher=launcher)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["widths"] == [20, 256, 256, 3]
    assert summary["ranks"] == ranks
    m = re.search(r"status 0; .* test accuracy ([0-9.]+)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(summary["test_accuracy"], abs=1e-3)
    assert float(m.group(1)) > 0.6  # three classes: chance is 1/3


def test_example_sparse_mlp_steps():
    out = _run_example("sparse_mlp_steps.py")
    assert "layer 0 is a csr_matrix" in out
    accuracies = [float(a) for a in re.findall(r"test accuracy ([0-9.]+)", out)]
    assert len(accuracies) == 3 and accuracies[-1] > 0.6, out
    assert out.count("evolved:") == 2
