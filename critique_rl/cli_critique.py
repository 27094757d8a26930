"""``critique-rl critique``: critique one response, or a JSONL file of them, with any critic backend.

Single request: prints one JSON object (text, verdict, kind, fallback, error, latency, ...) on stdout.
Batch: ``--input in.jsonl`` (fields ``question``/``prompt``, ``response``/``completion``,
``reference``/``answer``, ``verdict``) -> ``--output out.jsonl`` (stdout when omitted), one critique per line.

Bad flags, unreadable files, or a server that cannot be reached: one line on stderr and exit code 2. A single
request whose critique fell back because the requested backend failed still prints the fallback critique,
then exits 2 with a line naming the server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from critique_rl.errors import UserError

_ROW_ONLY_BACKENDS = ("feedback",)  # critics that read a dataset row's own column: not for one response


def _backends() -> list[str]:
    """The critic backends ``--backend`` accepts: the registered ones (critics.factory.CRITIC_BACKENDS)."""
    from critique_rl.critics.factory import CRITIC_BACKENDS

    return [name for name in CRITIC_BACKENDS.names() if name not in _ROW_ONLY_BACKENDS]
_KINDS = ("indicative", "ground_truth", "cot")


class CritiqueCommand(TyperCommand):
    """Click command class that reports flag errors (bad value, unknown option) as one line on stderr with
    exit code 2, instead of click's multi-line usage box. Register with
    ``app.command("critique", cls=CritiqueCommand)(critique_command)``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Parse flags; a usage error becomes ``error: <message>`` and exit code 2."""
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            # click's UsageError family (typer vendors click, so match by shape, not by class)
            is_usage = getattr(exc, "exit_code", None) == 2 and hasattr(exc, "format_message")
            if not is_usage or ctx.resilient_parsing or type(exc).__name__ == "NoArgsIsHelpError":
                raise
            typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            raise typer.Exit(2) from None


def check_base_url(url: str, flag: str = "--base-url") -> None:
    """An OpenAI-compatible base URL must be ``http(s)://host[:port][/path]`` (checked before any request)."""
    from urllib.parse import urlsplit

    example = "e.g. http://127.0.0.1:8000/v1"
    if not url.strip():
        raise UserError(f"{flag} is empty; give the server's address, {example}")
    if any(ch.isspace() for ch in url):
        raise UserError(f"{flag} {url!r}: a URL has no spaces; give the server's address, {example}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        hint = f" (did you mean http://{url}?)" if "://" not in url else ""
        raise UserError(f"{flag} {url!r}: must start with http:// or https://{hint}; {example}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
    except ValueError:
        raise UserError(f"{flag} {url!r}: the port is not a number in 0..65535; {example}") from None
    if not parts.hostname:
        raise UserError(f"{flag} {url!r}: no host name; {example}")
    if parts.query or parts.fragment:
        raise UserError(f"{flag} {url!r}: give the base URL without '?' or '#' parts; {example}")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(2)


def _read_requests(path: Path) -> list[Any]:
    from critique_rl.critics.base import CritiqueRequest

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"--input '{path}': cannot read it ({exc.strerror or exc})") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"--input '{path}' line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as "
                        "UTF-8 JSON lines") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"--input '{path}' line {n}: not valid JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"--input '{path}' line {n}: expected a JSON object")
        question = row.get("question", row.get("prompt"))
        response = row.get("response", row.get("completion"))
        if not isinstance(question, str) or not isinstance(response, str):
            raise UserError(f"--input '{path}' line {n}: needs string fields 'question' and 'response'")
        reference = row.get("reference", row.get("answer"))
        verdict = row.get("verdict")
        if verdict is not None and not isinstance(verdict, bool):
            raise UserError(f"--input '{path}' line {n}: 'verdict' must be true, false or null")
        out.append(
            CritiqueRequest(
                question=question,
                response=response,
                reference=None if reference is None else str(reference),
                verdict=verdict,
            )
        )
    if not out:
        raise UserError(f"--input '{path}': no requests in the file")
    return out


def critique_command(
    backend: str = typer.Option("rule", "--backend", help="Critic backend: a registered one (built in: rule, hf, openai)."),
    base_url: str | None = typer.Option(
        None, "--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (openai backend)."
    ),
    model: str | None = typer.Option(None, "--model", help="Model name (openai) or local model dir (hf)."),
    kind: str | None = typer.Option(
        None, "--kind", help="indicative, ground_truth or cot (default: cot for hf/openai, else ground_truth)."
    ),
    question: str | None = typer.Option(None, "--question", help="The question (single request)."),
    response: str | None = typer.Option(None, "--response", help="The response to critique (single request)."),
    reference: str | None = typer.Option(None, "--reference", help="Reference answer, if known."),
    verdict: bool | None = typer.Option(
        None, "--verdict/--no-verdict", help="The verifier's verdict, if known (correct / incorrect)."
    ),
    input_path: Path | None = typer.Option(None, "--input", help="JSONL file of requests (batch mode)."),
    output_path: Path | None = typer.Option(None, "--output", help="JSONL file for the critiques (batch mode)."),
    timeout: float = typer.Option(30.0, "--timeout", help="Per-request timeout in seconds (openai)."),
    max_retries: int = typer.Option(3, "--max-retries", help="Retries after the first try (openai)."),
    max_concurrency: int = typer.Option(8, "--max-concurrency", help="Most requests in flight (openai)."),
    api_key_env: str = typer.Option(
        "OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key (never printed)."
    ),
    cache: Path | None = typer.Option(None, "--cache", help="SQLite cache file for API replies (openai)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest critique, in tokens (hf/openai)."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature (hf/openai)."),
    template_dir: Path | None = typer.Option(None, "--template-dir", help="Folder overriding critique_*.j2."),
) -> None:
    """Critique a response (or a JSONL batch) and print the critique as JSON."""
    try:
        critic, requests, single = _setup(
            backend, base_url, model, kind, question, response, reference, verdict, input_path, output_path,
            timeout, max_retries, max_concurrency, api_key_env, cache, max_tokens, temperature, template_dir,
        )
    except UserError as exc:
        raise _fail(str(exc)) from None

    try:
        critiques = critic.critique(requests)
    finally:
        critic.close()
    errors = int(critic.metrics()["critic/errors"])
    where = getattr(critic, "url", None) or model or backend

    if single:
        typer.echo(json.dumps(critiques[0].to_dict(), ensure_ascii=False))
        if errors:
            raise _fail(f"{backend} critic at {where} failed: {critiques[0].error}; printed the fallback critique")
        return

    lines = "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in critiques)
    if output_path is None:
        sys.stdout.write(lines)
    else:
        try:
            output_path.parent.mkdir(parents=True, exist_ok=True)
            output_path.write_text(lines, encoding="utf-8")
        except OSError as exc:
            raise _fail(f"--output '{output_path}': cannot write it ({exc.strerror or exc})") from None
    if errors and errors == len(critiques):
        first = next(c.error for c in critiques if c.error)
        raise _fail(f"{backend} critic at {where} failed for all {errors} requests: {first}")
    if errors:
        typer.echo(f"warning: {errors} of {len(critiques)} critiques fell back after errors", err=True)


def _setup(
    backend: str, base_url: str | None, model: str | None, kind: str | None, question: str | None,
    response: str | None, reference: str | None, verdict: bool | None, input_path: Path | None,
    output_path: Path | None, timeout: float, max_retries: int, max_concurrency: int, api_key_env: str,
    cache: Path | None, max_tokens: int, temperature: float, template_dir: Path | None,
) -> tuple[Any, list[Any], bool]:
    """Validate the flags and build ``(critic, requests, single)``; raises UserError with one line."""
    from critique_rl.config import CriticConfig
    from critique_rl.critics.base import CritiqueRequest
    from critique_rl.critics.factory import build_critic

    if backend not in _backends():
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(_backends())}")
    if kind is not None and kind not in _KINDS:
        raise UserError(f"--kind {kind!r}: choose one of {', '.join(_KINDS)}")
    if kind is None:
        kind = "cot" if backend in ("hf", "openai") else "ground_truth"
    if backend == "rule" and kind == "cot":
        raise UserError("--kind cot needs a model: use --backend hf or openai")
    if backend != "openai" and base_url:
        raise UserError(f"--base-url is only used by --backend openai (got --backend {backend})")
    if base_url is not None:
        check_base_url(base_url)
    if backend in ("hf", "openai") and kind == "cot" and not model:
        raise UserError(f"--backend {backend} --kind cot needs --model")
    if timeout <= 0 or max_retries < 0 or max_concurrency < 1 or max_tokens < 1:
        raise UserError("--timeout must be > 0, --max-retries >= 0, --max-concurrency >= 1, --max-tokens >= 1")
    if template_dir is not None and not template_dir.is_dir():
        raise UserError(f"--template-dir '{template_dir}' is not a directory")

    single = input_path is None
    if single:
        if question is None or response is None:
            raise UserError("give --question and --response (one request), or --input FILE.jsonl (a batch)")
        if output_path is not None:
            raise UserError("--output goes with --input (batch mode)")
        requests = [CritiqueRequest(question=question, response=response, reference=reference, verdict=verdict)]
    else:
        if question is not None or response is not None or reference is not None or verdict is not None:
            raise UserError("--input (batch mode) cannot be combined with --question/--response/--reference/--verdict")
        requests = _read_requests(input_path)

    cfg = CriticConfig(
        backend=backend,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        model=model,
        base_url=base_url,
        api_key_env=api_key_env,
        temperature=temperature,
        max_tokens=max_tokens,
        max_concurrency=max_concurrency,
        timeout_s=timeout,
        max_retries=max_retries,
        cache_path=str(cache) if cache else None,
        template_dir=str(template_dir) if template_dir else None,
    )
    critic = build_critic(cfg)
    assert critic is not None
    return critic, requests, single
