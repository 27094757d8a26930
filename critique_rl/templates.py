"""jinja2 templates, rendered in the sandbox. Packaged templates live in critique_rl/prompts/*.j2;
a user folder (``template_dir``) overrides them file by file.

Text from critics and memory is data: it is only ever passed as a template *variable*, never compiled as a
template, so ``{{ ... }}`` inside a critique stays literal text.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

PACKAGED_PROMPTS = Path(__file__).parent / "prompts"


@lru_cache(maxsize=16)
def template_env(template_dir: str | None = None) -> ImmutableSandboxedEnvironment:
    loaders = []
    if template_dir:
        loaders.append(FileSystemLoader(str(Path(template_dir).expanduser())))
    loaders.append(FileSystemLoader(str(PACKAGED_PROMPTS)))
    return ImmutableSandboxedEnvironment(
        loader=ChoiceLoader(loaders),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, template_dir: str | None = None, **variables: Any) -> str:
    """Render packaged (or user-overridden) template ``name`` (e.g. ``"refine.j2"``) with ``variables``."""
    return template_env(template_dir).get_template(name).render(**variables).strip()
