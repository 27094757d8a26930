"""jinja2 templates, rendered in the sandbox. The packaged templates live in the top-level ``prompts/`` folder
of the repository (``prompts/*.j2``: copy it, edit, and point ``critic.template_dir`` at your copy); the wheel
carries them as package data ``critique_rl/prompts/*.j2`` (a setuptools ``package-dir`` mapping, see
``pyproject.toml``). A user folder (``template_dir``) overrides them file by file.

Text from critics and memory is data: it is only ever passed as a template *variable*, never compiled as a
template, so ``{{ ... }}`` inside a critique stays literal text.

A dataset row's other columns reach the templates by name: when ``question`` is a
:class:`critique_rl.data.Prompt`, its ``columns`` (e.g. ``rubric``, ``solution``) are variables too (the
template's own variables win on a name clash). :func:`render_conversation` renders a conversational prompt
with the policy tokenizer's chat template.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from critique_rl.errors import UserError

TEMPLATE_GLOB = "*.j2"


def packaged_prompts_dir() -> Path:
    """The folder of the packaged templates: ``critique_rl/prompts`` in an installed wheel, else (a source
    checkout, an editable install) the repository's top-level ``prompts/``."""
    here = Path(__file__).resolve().parent
    for folder in (here / "prompts", here.parent / "prompts"):
        if folder.is_dir() and any(folder.glob(TEMPLATE_GLOB)):
            return folder
    return here / "prompts"


PACKAGED_PROMPTS = packaged_prompts_dir()
"""Where :func:`render` finds a template that ``template_dir`` does not override."""


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
    columns = getattr(variables.get("question"), "columns", None)
    if columns:  # the row's other dataset columns, by name; the template's own variables win
        variables = {**{k: v for k, v in columns.items() if isinstance(k, str) and k.isidentifier()}, **variables}
    try:
        return template_env(template_dir).get_template(name).render(**variables).strip()
    except TemplateError as exc:
        raise template_error(name, template_dir, exc) from None
    except UnicodeDecodeError:
        raise UserError(f"template {name} (critic.template_dir '{template_dir}'): not UTF-8 text; save it as "
                        "UTF-8") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as exc:
        if not template_dir:  # a packaged template failing is a bug: keep its stack
            raise
        raise template_error(name, template_dir, exc) from None


TEMPLATE_VARIABLES: dict[str, dict[str, Any]] = {
    "critique_cot.j2": {"question": "12+34=", "response": "46", "reference": "46"},
    "critique_ground_truth.j2": {"answer": "46", "verdict": False, "reference": "46", "question": "12+34="},
    "critique_indicative.j2": {"answer": "46", "verdict": False, "reference": "46", "question": "12+34="},
    "refine.j2": {"question": "12+34=", "response": "36", "critique": "Your answer 36 is incorrect."},
    "lesson.j2": {"question": "12+34=", "response": "36", "reference": "46", "critique": "incorrect",
                  "task": "addition", "previous_error": None},
    "memory_context.j2": {"demos": ["12+34=46"], "lessons": ["When adding, carry the 1."]},
    "judge_group.j2": {"question": "12+34=", "responses": ["46", "36"], "max_score": 10},
}
"""The variables each packaged template is rendered with (sample values), for :func:`check_templates`."""


def template_error(name: str, template_dir: str | None, exc: Exception) -> UserError:
    """One line naming the template file (and line), what is wrong and the fix."""
    where = getattr(exc, "filename", None) or name
    line = getattr(exc, "lineno", None)
    tb = exc.__traceback__
    while tb is not None:  # a runtime error inside a template: jinja maps its frames to the .j2 file and line
        if tb.tb_frame.f_code.co_filename.endswith(".j2"):
            where, line = tb.tb_frame.f_code.co_filename, tb.tb_lineno
        tb = tb.tb_next
    at = f"{where}, line {line}" if line else where
    kinds = {"TemplateSyntaxError": "syntax error", "TemplateNotFound": "template not found",
             "TemplatesNotFound": "template not found", "UndefinedError": "undefined variable",
             "SecurityError": "forbidden by the sandbox"}
    kind = kinds.get(type(exc).__name__, type(exc).__name__)
    message = " ".join(str(exc).split())[:200]
    folder = f"critic.template_dir '{template_dir}'" if template_dir else "the packaged templates"
    variables = TEMPLATE_VARIABLES.get(name)
    known = f" (variables of {name}: {', '.join(variables)}, and the dataset's columns by name)" if variables else ""
    return UserError(f"template {at} ({folder}): {kind}: {message}; fix or remove the file{known}")


def check_templates(template_dir: str | None, columns: Iterable[str] | None = None) -> None:
    """Render every template of ``template_dir`` that overrides a packaged one, with sample variables, so a
    broken user template is a one-line error before training starts rather than in the middle of a step.

    A template may also read dataset columns by name (``{{ rubric }}``): ``columns`` (default: the columns of
    the rows this process has loaded, :func:`critique_rl.data.seen_columns`) get sample values; any other
    unknown name is an undefined-variable error naming the file."""
    if not template_dir:
        return
    if columns is None:
        from critique_rl.data import seen_columns

        columns = seen_columns()
    samples = {c: f"<{c}>" for c in columns if isinstance(c, str) and c.isidentifier()}
    folder = Path(template_dir).expanduser()
    for name, variables in TEMPLATE_VARIABLES.items():
        if (folder / name).is_file():
            render(name, template_dir, **{**samples, **variables})


def render_conversation(tokenizer: Any, prompt: Any, use_chat: bool, system: str | None = None) -> str:
    """The text the policy is conditioned on for a conversational prompt (a :class:`critique_rl.data.Prompt`
    with ``messages``): its messages (after ``system``, when given) through the tokenizer's chat template, with
    the generation prompt. Without a chat template (or with ``use_chat_template: no``) a one-line
    :class:`UserError` naming the row."""
    where = getattr(prompt, "where", "") or "a conversational prompt"
    if not use_chat or not getattr(tokenizer, "chat_template", None):
        why = "use_chat_template is 'no'" if getattr(tokenizer, "chat_template", None) else \
            "the model's tokenizer has no chat template"
        raise UserError(f"{where}: the prompt is a list of messages (conversational) but {why}; use a model "
                        "whose tokenizer has a chat_template (an instruct model) with use_chat_template auto, "
                        "or give prompts as strings")
    messages = ([{"role": "system", "content": system}] if system else []) + list(prompt.messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:  # e.g. "System role not supported"
        message = " ".join(str(exc).split())[:200]
        raise UserError(f"{where}: the tokenizer's chat template cannot render these messages ({message}); "
                        "change the messages (e.g. fold the system message into the user message)") from None
