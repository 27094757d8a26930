"""``critique-rl push RUN --repo-id ID``: upload a run's ``final/`` model (with its model card) to the Hugging Face
Hub through ``huggingface_hub``.

The token comes from the environment variable ``HF_TOKEN`` only (never a flag, never a stored login, never printed
or logged); ``HF_ENDPOINT`` points the upload at another Hub (a mirror, a local test server). The model card
(``final/README.md``, :mod:`critique_rl.model_card`) is written first when the run has none, or with
``--card`` always. Register with ``app.command("push")(push_command)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from critique_rl.errors import UserError
from critique_rl.model_card import CARD_FILE, REPO_PLACEHOLDER, write_model_card

TOKEN_ENV = "HF_TOKEN"
DEFAULT_ENDPOINT = "https://huggingface.co"


def _redact(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def run_dir_of(path: Path) -> Path:
    """The run directory for ``path`` (a run directory, or its ``final/`` folder)."""
    path = path.expanduser()
    if path.name == "final" and (path.parent / "config.yaml").is_file():
        return path.parent
    return path


def push_run(
    run: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    card: bool = False,
    api: Any | None = None,
) -> str:
    """Upload ``RUN/final`` to the model repo ``repo_id`` (created when missing) and return the commit URL.

    ``api``: an ``huggingface_hub.HfApi`` (default: one for ``$HF_ENDPOINT`` with the token from ``$HF_TOKEN``).
    Every failure is a one-line :class:`UserError` that never contains the token."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from critique_rl.train.evaluate import check_model_dir

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"--repo-id {repo_id!r}: give 'user/name' or 'org/name' (letters, digits, '-', '_', '.')") \
            from None
    if "/" not in repo_id:
        raise UserError(f"--repo-id {repo_id!r}: give the namespace too, 'user/name' or 'org/name'")
    run_dir = run_dir_of(Path(run))
    final = run_dir / "final"
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run}' does not exist")
    check_model_dir(final, "final model", allow_adapter=True)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UserError(f"${TOKEN_ENV} is not set; export a Hugging Face write token "
                        "(https://huggingface.co/settings/tokens) in HF_TOKEN and run push again")
    card_path = final / CARD_FILE
    if card or not card_path.is_file():
        write_model_card(run_dir, base_model=base_model, repo_id=repo_id)
    elif REPO_PLACEHOLDER in (text := card_path.read_text(encoding="utf-8", errors="replace")):
        card_path.write_text(text.replace(REPO_PLACEHOLDER, f'"{repo_id}"'), encoding="utf-8")  # usage example
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT
    api = api if api is not None else HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"critique-rl: upload {run_dir.name}"
    try:
        api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True, token=token)
        info = api.upload_folder(folder_path=str(final), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message, token=token)
    except Exception as exc:  # HfHubHTTPError (an OSError), httpx connection errors, malformed responses
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = {401: "HF_TOKEN was refused; check it", 403: "HF_TOKEN may not write to this namespace",
                404: "no such repo or revision"}.get(status or 0, f"is {endpoint} reachable?")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(_redact(f"push to {repo_id} at {endpoint} failed: {first} ({hint})", token)) from None
    return str(getattr(info, "commit_url", info))


def push_command(
    run: Path = typer.Argument(..., help="Run directory (or its final/ folder) written by `critique-rl train`."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub model repo, 'user/name' or 'org/name'."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (when it does not exist)."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to push to (default: main)."),
    commit_message: str | None = typer.Option(None, "--commit-message", help="Commit message."),
    base_model: str | None = typer.Option(None, "--base-model",
                                          help="Hub id of the model the run started from, for the card's "
                                               "base_model (default: read from the run's config)."),
    card: bool = typer.Option(False, "--card", help="Rewrite final/README.md (the model card) before pushing."),
) -> None:
    """Upload RUN/final (weights, tokenizer, model card) to the Hugging Face Hub. Token: $HF_TOKEN."""
    try:
        url = push_run(run, repo_id, private=private, revision=revision, commit_message=commit_message,
                       base_model=base_model, card=card)
    except UserError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"pushed {run_dir_of(run) / 'final'} to {repo_id}: {url}")
