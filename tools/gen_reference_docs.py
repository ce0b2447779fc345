"""Regenerate the documentation pages that are generated from the code.

    python tools/gen_reference_docs.py           # write them
    python tools/gen_reference_docs.py --check   # exit 1 and name the stale pages, write nothing

- docs/configuration-reference.md: every config key (hpc_sparse/config.py's dataclasses);
- docs/cli-reference.md: every hpc-sparse subcommand and option (hpc_sparse/cli.py's parser).

Run it after adding or changing a config key, a subcommand or an option, and commit the
pages; tests/test_docs.py fails while they are out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generated_pages() -> dict[Path, str]:
    """Path of each generated page -> its text, as the code in this checkout generates it."""
    from hpc_sparse.cli import _parser
    from hpc_sparse.reference import cli_reference_markdown, config_reference_markdown

    return {ROOT / "docs" / "configuration-reference.md": config_reference_markdown(),
            ROOT / "docs" / "cli-reference.md": cli_reference_markdown(_parser())}


def stale_pages() -> list[Path]:
    """The generated pages whose committed text differs from what the code generates."""
    return [p for p, text in generated_pages().items() if not p.is_file() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale pages (exit 1 if any)")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date; regenerate: python tools/gen_reference_docs.py")
        return 1 if stale else 0
    for p, text in generated_pages().items():
        changed = not p.is_file() or p.read_text() != text
        p.write_text(text)
        print(f"{'wrote' if changed else 'unchanged'} {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
