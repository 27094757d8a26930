"""The model card of a run: ``final/README.md`` in the Hugging Face model-card format.

:func:`write_model_card` reads what a finished run leaves in its directory (``config.yaml``, ``summary.json``,
``metrics.jsonl``, the memory bank) and writes ``RUN/final/README.md``: YAML front matter (``base_model``,
``library_name``, ``pipeline_tag``, ``tags``, ``datasets``, a ``model-index`` with the held-out accuracy) and a
body with the method, the configuration, the evaluation before and after RL, the memory bank's size and the
papers behind the methods this run's config turned on (arXiv ids). ``critique-rl push`` uploads it with the
weights (:mod:`critique_rl.cli_push`).

Nothing here is secret: the card's config has URLs without user info, queries or fragments, and the name of the
environment variable that holds an API key, never a key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from critique_rl.errors import UserError

CARD_FILE = "README.md"
LIBRARY_NAME = "transformers"
REPO_PLACEHOLDER = '"REPO_ID"'
"""Stands for the Hub repo id in the card's usage example until ``critique-rl push`` knows it."""
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class Method:
    """A method the run used: its name, the paper (arXiv id, None when it has none) and what turned it on."""

    name: str
    arxiv: str | None
    because: str


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def methods_used(cfg: dict[str, Any]) -> list[Method]:
    """The methods a run config turns on, each with its paper; in the order a reader meets them in a step."""
    out: list[Method] = []
    rl = bool(_get(cfg, "max_steps", 0)) or any(p.get("kind") == "rl" for p in _get(cfg, "phases", []) or [])
    if _get(cfg, "sft_steps", 0) or any(p.get("kind") == "sft" for p in _get(cfg, "phases", []) or []):
        out.append(Method("SFT warm-up before RL (cold start, as DeepSeek-R1)", "2501.12948",
                          f"sft_steps: {_get(cfg, 'sft_steps')}"))
    if not rl:
        return out
    estimator = _get(cfg, "advantage_estimator", "dr_grpo")
    out.append(Method("GRPO: group-relative advantages", "2402.03300",
                      f"num_generations: {_get(cfg, 'num_generations')}"))
    out.append(Method("PPO clipped objective", "1707.06347",
                      f"clip_eps_low/high: {_get(cfg, 'clip_eps_low')}/{_get(cfg, 'clip_eps_high')}"))
    if estimator == "dr_grpo" or _get(cfg, "loss_aggregation") == "token_sum_norm":
        out.append(Method("Dr. GRPO: no std / length normalisation", "2503.20783",
                          f"advantage_estimator: {estimator}, loss_aggregation: {_get(cfg, 'loss_aggregation')}"))
    dapo = []
    if _get(cfg, "loss_aggregation") == "token_mean":
        dapo.append("loss_aggregation: token_mean")
    if (_get(cfg, "clip_eps_high") or 0) > (_get(cfg, "clip_eps_low") or 0):
        dapo.append("clip-higher")
    if _get(cfg, "dynamic_sampling.enabled"):
        dapo.append("dynamic_sampling")
    if dapo:
        out.append(Method("DAPO", "2503.14476", ", ".join(dapo)))
    if estimator in ("w_reinforce", "psr", "nsr"):
        out.append(Method("Positive/negative sample reinforcement (W-REINFORCE)", "2506.01347",
                          f"advantage_estimator: {estimator}"))
    critic_on = _get(cfg, "critique_on", "none") != "none" and _get(cfg, "critic.backend", "none") != "none"
    source = _get(cfg, "refinement_source", "critique")
    if critic_on and source == "critique":
        out.append(Method("Critique-GRPO: refinements from natural-language critiques", "2506.03106",
                          f"critique_on: {_get(cfg, 'critique_on')}, critic: {_get(cfg, 'critic.backend')} "
                          f"({_get(cfg, 'critic.kind')})"))
    if _get(cfg, "offpolicy_gamma") is not None or (source == "reference" and _get(cfg, "critique_on") != "none"):
        why = (f"offpolicy_gamma: {_get(cfg, 'offpolicy_gamma')}" if _get(cfg, "offpolicy_gamma") is not None
               else "refinement_source: reference")
        out.append(Method("LUFFY: off-policy guidance (shaped / reference samples)", "2504.14945", why))
    if (_get(cfg, "distill_weight") or 0) > 0:
        why = f"distill_weight: {_get(cfg, 'distill_weight')}, distill_mode: {_get(cfg, 'distill_mode')}"
        out.append(Method("Directive distillation (OpenClaw-RL)", "2603.10165", why))
        out.append(Method("Self-distillation with a critique-conditioned teacher (SDPO)", "2601.20802", why))
        if _get(cfg, "distill_mode") == "topk_logits" and _get(cfg, "distill_divergence") == "jsd":
            out.append(Method("Generalised JSD (GKD)", "2306.13649", "distill_divergence: jsd"))
    aggregator = _get(cfg, "reward_aggregator", "weighted_sum")
    if aggregator == "gdpo":
        out.append(Method("GDPO: per-reward group normalisation", "2601.05242", "reward_aggregator: gdpo"))
    if aggregator == "dvao":
        out.append(Method("DVAO: variance-adaptive reward weights", "2605.25604", "reward_aggregator: dvao"))
    rewards = [str(r) for r in _get(cfg, "reward_funcs", []) or []]
    if "brier" in rewards:
        out.append(Method("RLCR: Brier-score calibration reward", "2507.16806", "reward_funcs: brier"))
    if _get(cfg, "gates") or _get(cfg, "low_variance_filter.enabled"):
        why = f"gates: {_get(cfg, 'gates')}" if _get(cfg, "gates") else "low_variance_filter"
        out.append(Method("DRO: rubric gates / low-variance query filter", "2506.13351", why))
    if _get(cfg, "tasks") and _get(cfg, "task_order", "joint") != "joint":
        out.append(Method("Omni-Thinker: task order by output entropy", "2507.14783",
                          f"task_order: {_get(cfg, 'task_order')}"))
    if _get(cfg, "lora.enabled"):
        out.append(Method("LoRA adapters", "2106.09685", f"lora.r: {_get(cfg, 'lora.r')}"))
    if _get(cfg, "rollout_backend") == "vllm" and _get(cfg, "tis_cap") is not None:
        out.append(Method("Truncated importance sampling for engine/trainer mismatch (Yao et al. 2025)", None,
                          f"rollout_backend: vllm, tis_cap: {_get(cfg, 'tis_cap')}"))
    if _get(cfg, "memory.enabled"):
        out.append(Method("Memory bank of demonstrations and lessons (SkillRL-style)", None,
                          f"memory.embeddings: {_get(cfg, 'memory.embeddings')}"))
    return out


# ---------------------------------------------------------------------------------------------------------
# reading a run directory

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"'{path}' is not readable JSON ({exc}); was the run directory edited by hand?") from None
    return data if isinstance(data, dict) else {}


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as a dict (a one-line error when it is missing or not YAML)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no config.yaml; pass a run directory written by `critique-rl train`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"'{path}' is not readable YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' does not hold a run config (a YAML mapping)")
    return data


def eval_history(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, eval/accuracy)`` from ``metrics.jsonl`` (each step once, the last row of a step wins)."""
    path = run_dir / "metrics.jsonl"
    found: dict[int, float] = {}
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("eval/accuracy"), int | float) and "step" in row:
            found[int(row["step"])] = float(row["eval/accuracy"])
    return sorted(found.items())


def bank_size(path: Path) -> dict[str, int] | None:
    """Counts per record kind and the file size of the SQLite memory bank at ``path`` (opened read-only);
    None when there is no bank file."""
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall()
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    counts = {str(kind): int(n) for kind, n in rows}
    return {"demonstrations": counts.get("demonstration", 0), "lessons": counts.get("lesson", 0),
            "size_bytes": path.stat().st_size}


def _safe_url(value: str) -> str:
    parts = urlsplit(value)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def public_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with every URL reduced to scheme://host:port/path (no user info, query or fragment)."""
    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        if isinstance(node, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", node):
            return _safe_url(node)
        return node
    return clean(cfg)


def resolve_base_model(cfg: dict[str, Any], given: str | None = None) -> str | None:
    """The Hub id of the model the run started from: ``given``; else ``model`` when it is a Hub id; else, for a
    local folder, its config.json ``_name_or_path`` when that is a Hub id; None for the in-repo tiny model or
    a local model whose Hub id is unknown."""
    if given:
        return given
    model = str(_get(cfg, "model", "") or "")
    if not model or model == "tiny":
        return None
    local = Path(model).expanduser()
    for part in local.parts:  # a Hub cache snapshot: .../models--Org--Name/snapshots/<sha>
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:3])
    if local.is_dir():
        name = _read_json(local / "config.json").get("_name_or_path")
        return name if isinstance(name, str) and HUB_ID.match(name) and not Path(name).exists() else None
    return model if HUB_ID.match(model) and not local.exists() else None


# ---------------------------------------------------------------------------------------------------------
# rendering

def _pct(v: Any) -> str:
    return f"{float(v):.1%}" if isinstance(v, int | float) else "-"


def front_matter(cfg: dict[str, Any], summary: dict[str, Any], base_model: str | None, name: str) -> dict[str, Any]:
    """The card's YAML metadata (Hugging Face model-card fields)."""
    lora_adapter = bool(_get(cfg, "lora.enabled")) and not _get(cfg, "lora.merge_final", True)
    tags = ["critique-rl", "reinforcement-learning", "grpo"]
    if any(m.arxiv == "2506.03106" for m in methods_used(cfg)):
        tags.append("critique-grpo")
    if _get(cfg, "memory.enabled"):
        tags.append("memory")
    if _get(cfg, "lora.enabled"):
        tags.append("lora")
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
    meta["library_name"] = "peft" if lora_adapter else LIBRARY_NAME
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags
    dataset = _get(cfg, "dataset_name")
    if dataset:
        meta["datasets"] = [str(dataset)]
    after = summary.get("eval_accuracy_after_rl")
    if isinstance(after, int | float):
        task = str(summary.get("task") or _get(cfg, "task") or "task")
        meta["model-index"] = [{
            "name": name,
            "results": [{
                "task": {"type": "text-generation", "name": task},
                "dataset": {"name": str(dataset or _get(cfg, "eval_file") or f"{task} held-out set"),
                            "type": str(dataset or task)},
                "metrics": [{"type": "accuracy", "value": round(float(after), 4),
                             "name": f"greedy accuracy ({summary.get('eval_n', '?')} held-out problems)"}],
            }],
        }]
    return meta


_CONFIG_ROWS = ("model", "task", "dataset_name", "train_file", "reward_funcs", "reward_weights",
                "reward_aggregator", "advantage_estimator", "loss_aggregation", "max_steps", "num_generations",
                "generation_batch_size", "learning_rate", "kl_beta", "critique_on", "refinements_per_group",
                "offpolicy_gamma", "distill_weight", "critic.backend", "critic.kind", "critic.model",
                "memory.enabled", "lora.enabled", "rollout_backend", "seed")


def render_model_card(run_dir: str | Path, base_model: str | None = None, name: str | None = None) -> str:
    """The text of ``final/README.md`` for the run in ``run_dir`` (see the module docstring)."""
    run = Path(run_dir)
    cfg = public_config(read_config(run))
    summary = _read_json(run / "summary.json")
    name = name or run.resolve().name
    base = resolve_base_model(cfg, base_model)
    meta = front_matter(cfg, summary, base, name)
    methods = methods_used(cfg)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    start = (f"[{base}](https://huggingface.co/{base})" if base else
             "a tiny model built from scratch by critique-rl" if _get(cfg, "model") == "tiny" else
             f"a local model (`{Path(str(_get(cfg, 'model'))).name}`)")
    lines += [f"Trained with critique-rl from {start} on the `{summary.get('task') or _get(cfg, 'task')}` "
              f"task: {summary.get('steps', _get(cfg, 'max_steps'))} RL steps"
              + (f", {len(methods)} methods enabled (below)." if methods else "."), ""]
    lines += ["## Method", ""]
    for m in methods:
        ref = f" ([arXiv:{m.arxiv}](https://arxiv.org/abs/{m.arxiv}))" if m.arxiv else ""
        lines.append(f"- {m.name}{ref}; `{m.because}`")
    lines += ["", "## Evaluation", ""]
    before, after = summary.get("eval_accuracy_before_rl"), summary.get("eval_accuracy_after_rl")
    if after is None:
        lines.append("No evaluation was recorded (the run did not finish, or `summary.json` is missing).")
    else:
        held = f"{summary.get('eval_n', '?')} held-out problems" + (
            f" from `{_get(cfg, 'eval_file')}`" if _get(cfg, "eval_file") else f" of `{summary.get('task')}`")
        lines += [f"Greedy accuracy on {held} (`critique-rl eval` reproduces it):", "",
                  "| stage | accuracy |", "|---|---|",
                  f"| before RL (after the SFT warm-up) | {_pct(before)} |",
                  f"| after RL ({summary.get('steps', '?')} steps) | {_pct(after)} |"]
        if isinstance(before, int | float) and isinstance(after, int | float):
            lines.append(f"| RL gain | {(after - before) * 100:+.1f} points |")
        by_before = summary.get("eval_accuracy_before_rl_by_task") or {}
        for task, acc in (summary.get("eval_accuracy_after_rl_by_task") or {}).items():
            lines.append(f"| {task}: before -> after | {_pct(by_before.get(task))} -> {_pct(acc)} |")
        if summary.get("eval_ece_before_rl") is not None and summary.get("eval_ece_after_rl") is not None:
            lines.append(f"| calibration ECE: before -> after | {summary['eval_ece_before_rl']:.3f} -> "
                         f"{summary['eval_ece_after_rl']:.3f} |")
        history = eval_history(run)
        if len(history) > 2:
            shown = history if len(history) <= 20 else history[:: max(1, len(history) // 20)] + [history[-1]]
            lines += ["", "Held-out accuracy during training: "
                      + ", ".join(f"step {s}: {_pct(a)}" for s, a in dict(shown).items()) + "."]
    if summary.get("critique_refinements"):
        lines += ["", f"Refinements written: {summary['critique_refinements']}, correct: "
                  f"{_pct(summary.get('critique_refine_success_rate'))}; all-wrong groups rescued by a refinement: "
                  f"{summary.get('critique_groups_rescued', 0)} of {summary.get('critique_all_wrong_groups', 0)}."]
    lines += ["", "## Memory bank", ""]
    if _get(cfg, "memory.enabled"):
        bank_path = Path(str(_get(cfg, "memory.bank_path") or run / "memory.sqlite"))
        size = bank_size(bank_path if bank_path.is_absolute() or bank_path.exists() else run / bank_path.name)
        if size is not None:
            lines.append(f"{size['demonstrations']} demonstration(s) and {size['lessons']} lesson(s) "
                         f"({size['size_bytes']:,} bytes, `{bank_path.name}`, not uploaded with the weights). "
                         "Inspect it with `critique-rl memory list --bank PATH`.")
        else:
            lines.append(f"{summary.get('memory_demonstrations', '?')} demonstrations and "
                         f"{summary.get('memory_lessons', '?')} lessons at the end of training "
                         "(the bank file is not beside the run).")
    else:
        lines.append("Memory was off for this run (no bank).")
    rows = [(key, _get(cfg, key)) for key in _CONFIG_ROWS]
    lines += ["", "## Configuration", "", "| field | value |", "|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in rows if v not in (None, [], {}, "")]
    lines += ["", "<details><summary>Full run config (config.yaml)</summary>", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    if meta["library_name"] == "peft":  # the adapter alone (lora.merge_final: false)
        load = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                f"model = AutoPeftModelForCausalLM.from_pretrained({REPO_PLACEHOLDER})"]
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"model = AutoModelForCausalLM.from_pretrained({REPO_PLACEHOLDER})"]
    lines += ["## Usage", "", "```python", *load, f"tokenizer = AutoTokenizer.from_pretrained({REPO_PLACEHOLDER})",
              "```", ""]
    cited = [m for m in methods if m.arxiv]
    lines += ["## Citations", ""]
    if cited:
        lines += [f"- {m.name}: arXiv:{m.arxiv}, https://arxiv.org/abs/{m.arxiv}" for m in cited]
    else:
        lines.append("No papers: this run used none of the cited methods.")
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str | Path, base_model: str | None = None, repo_id: str | None = None) -> Path:
    """Write ``RUN/final/README.md`` (the model card; see :func:`render_model_card`) and return its path.
    ``repo_id`` fills the usage example (``REPO_ID`` otherwise)."""
    run = Path(run_dir)
    final = run / "final"
    if not final.is_dir():
        raise UserError(f"'{run}' has no final/ folder; the run has not finished (or pass the run directory, "
                        "not final/ itself)")
    text = render_model_card(run, base_model=base_model)
    if repo_id:
        text = text.replace(REPO_PLACEHOLDER, json.dumps(repo_id))
    path = final / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path
