"""Griffe extension (mkdocs.yml, mkdocstrings' python handler): Sphinx roles in docstrings.

The project's docstrings cross-reference with Sphinx roles (``:func:`load_config```,
``:class:`~hpc_sparse.errors.UserError```), which Markdown would show verbatim. This
extension resolves each name in the scope of the object whose docstring it is (its
module's imports included) and replaces the role by an optional cross-reference: a link
where the target is documented on the site, the name in code font where it is not.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+?)(\(\))?`")


def _qualified(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as written in ``obj``'s docstring, or ``name`` itself."""
    if name.startswith("hpc_sparse."):
        return name
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head)
    except (griffe.NameResolutionError, KeyError, AttributeError):
        return name
    return f"{path}.{rest}" if rest else path


def replace_roles(obj: griffe.Object, text: str) -> str:
    """``text`` with every Sphinx role replaced by an optional autorefs cross-reference."""

    def fix(m: re.Match[str]) -> str:
        tilde, name, call = m.groups()
        shown = (name.rsplit(".", 1)[-1] if tilde else name) + (call or "")
        return f'<autoref identifier="{_qualified(obj, name)}" optional><code>{shown}</code></autoref>'

    return ROLE.sub(fix, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg)

    def _walk(self, obj: griffe.Object) -> None:
        if obj.is_alias:
            return
        if obj.docstring is not None:
            obj.docstring.value = replace_roles(obj, obj.docstring.value)
        for member in obj.members.values():
            self._walk(member)
