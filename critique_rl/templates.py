"""jinja2 templates, rendered in the sandbox. Packaged templates live in critique_rl/prompts/*.j2;
a user folder (``template_dir``) overrides them file by file.

Text from critics and memory is data: it is only ever passed as a template *variable*, never compiled as a
template, so ``{{ ... }}`` inside a critique stays literal text.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from critique_rl.errors import UserError

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
    """Render packaged (or user-overridden) template ``name`` (e.g. ``"refine.j2"``) with ``variables``.

    A broken template (syntax error, missing include, undefined variable, sandbox violation) raises a one-line
    :class:`~critique_rl.errors.UserError` naming the file and line, never a jinja2 stack."""
    try:
        return template_env(template_dir).get_template(name).render(**variables).strip()
    except TemplateError as exc:
        raise template_error(name, template_dir, exc) from None
    except UnicodeDecodeError:
        raise UserError(f"template {name} (critic.template_dir '{template_dir}'): not UTF-8 text; save it as "
                        "UTF-8") from None


TEMPLATE_VARIABLES: dict[str, dict[str, Any]] = {
    "critique_cot.j2": {"question": "12+34=", "response": "46", "reference": "46"},
    "critique_ground_truth.j2": {"answer": "46", "verdict": False, "reference": "46", "question": "12+34="},
    "critique_indicative.j2": {"answer": "46", "verdict": False, "reference": "46", "question": "12+34="},
    "refine.j2": {"question": "12+34=", "response": "36", "critique": "Your answer 36 is incorrect."},
    "lesson.j2": {"question": "12+34=", "response": "36", "reference": "46", "critique": "incorrect",
                  "task": "addition", "previous_error": None},
    "memory_context.j2": {"demos": ["12+34=46"], "lessons": ["When adding, carry the 1."]},
}
"""The variables each packaged template is rendered with (sample values), for :func:`check_templates`."""


def template_error(name: str, template_dir: str | None, exc: Exception) -> UserError:
    """One line naming the template file (and line), what is wrong and the fix."""
    where = getattr(exc, "filename", None) or name
    line = getattr(exc, "lineno", None)
    at = f"{where}, line {line}" if line else where
    kinds = {"TemplateSyntaxError": "syntax error", "TemplateNotFound": "template not found",
             "TemplatesNotFound": "template not found", "UndefinedError": "undefined variable",
             "SecurityError": "forbidden by the sandbox"}
    kind = kinds.get(type(exc).__name__, type(exc).__name__)
    message = " ".join(str(exc).split())[:200]
    folder = f"critic.template_dir '{template_dir}'" if template_dir else "the packaged templates"
    variables = TEMPLATE_VARIABLES.get(name)
    known = f" (variables of {name}: {', '.join(variables)})" if variables else ""
    return UserError(f"template {at} ({folder}): {kind}: {message}; fix or remove the file{known}")


def check_templates(template_dir: str | None) -> None:
    """Render every template of ``template_dir`` that overrides a packaged one, with sample variables, so a
    broken user template is a one-line error before training starts rather than in the middle of a step."""
    if not template_dir:
        return
    folder = Path(template_dir).expanduser()
    for name, variables in TEMPLATE_VARIABLES.items():
        if (folder / name).is_file():
            render(name, template_dir, **variables)
