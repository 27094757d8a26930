"""MkDocs hook: drop the reST role prefixes (``:func:``, ``:class:``, ...) that docstrings use before a name.

The package's docstrings cross-reference with Sphinx roles (``:func:`parse_verdict```); mkdocstrings renders
Markdown, where the role shows up as literal text before the code span (":func:parse_verdict"). This hook
removes the role and keeps the code span, on the rendered HTML of every page.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):(?=<code>)")


def strip_roles(html: str) -> str:
    """``:func:<code>x</code>`` -> ``<code>x</code>``."""
    return _ROLE.sub("", html)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return strip_roles(html)
