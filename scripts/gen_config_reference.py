"""Generate the configuration reference page (``docs/configuration.md``) from the config dataclasses.

Every YAML key is a field of ``critique_rl.config.TrainConfig`` or of one of its nested sections
(``critic:``, ``memory:``, ...). Each field is documented where it is declared, by the string literal that
follows it (an attribute docstring); the ``# --- group ---`` comments in ``TrainConfig`` group its fields.
This module reads both from the source (``ast``) and the types and defaults from the dataclasses themselves,
so the page can never disagree with the code.

Used two ways:

* as an MkDocs hook (``hooks: [scripts/gen_config_reference.py]`` in ``mkdocs.yml``): ``on_files`` adds the
  page to every build, generated from the code being documented, so it is never stale;
* as a script: ``python scripts/gen_config_reference.py [OUT.md]`` prints the page (or writes it).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

PAGE = "configuration.md"

_INTRO = """\
# Configuration reference

Every key of a run's YAML file is a field of `critique_rl.config.TrainConfig` (alias `CritiqueGRPOConfig`, the
same object you pass as `args=` in Python), or of one of its nested sections below. Unknown keys and wrong
types are rejected with one line naming the key and the fix (exit code 2). An empty file trains the class
defaults (1000 SFT + 100 RL steps), which are **not** the demo's settings: `critique-rl train` with no file
runs the embedded demo, `examples/critique_grpo_cpu.yaml` is that demo as a file.

This page is generated from the field documentation in `critique_rl/config.py` and
`critique_rl/config_sections.py` (`scripts/gen_config_reference.py`, run by every docs build), so it lists
exactly the fields of the code it was built from.

```yaml
# a run config: top-level keys are TrainConfig fields, sections are nested mappings
model: /models/Qwen2.5-1.5B-Instruct
train_file: data/train.jsonl
reward_funcs: [correctness]
critic: {backend: openai, model: gpt-4o-mini, kind: ground_truth}
memory: {enabled: true}
```
"""

# Short descriptions for fields declared without a docstring in the config modules. A field's own docstring
# always wins; tests/test_docs_site.py checks that every key here is still a field (no stale entries).
FALLBACK_DOCS: dict[str, str] = {
    "eval_file": "Held-out rows (same formats and columns as `train_file`) for the before/after evaluation. "
                 "None = the task's held-out problems.",
    "output_dir": "Run directory: config.yaml, metrics.jsonl, rollouts.jsonl, checkpoints/, final/, summary.json.",
    "seed": "Seed of Python, NumPy and torch; the data order and refinement choices follow it.",
    "device": "`auto`: CUDA when available, else CPU. `cuda` without a GPU is a one-line error.",
    "tiny_hidden_size": "Hidden size of the in-process tiny Llama (`model: tiny`).",
    "tiny_layers": "Decoder layers of the tiny model.",
    "tiny_vocab_size": "Vocabulary of the tiny model's byte-level BPE tokenizer (at least 259).",
    "sft_steps": "Steps of the supervised warm-up before RL (0 = start RL from the model as loaded).",
    "sft_batch_size": "Rows per SFT step.",
    "sft_learning_rate": "Learning rate of the SFT warm-up.",
    "max_steps": "RL steps (optimizer steps over one generation batch each). With `phases`: the sum of the rl "
                 "phases' steps.",
    "learning_rate": "AdamW learning rate of the RL steps.",
    "weight_decay": "AdamW weight decay.",
    "lr_scheduler": "RL learning-rate schedule over `max_steps`.",
    "warmup_steps": "Linear learning-rate warm-up steps at the start of RL.",
    "max_grad_norm": "Gradient-norm clip of each update.",
    "temperature": "Sampling temperature of rollouts (log-probs are recorded under logits / temperature).",
    "top_p": "Nucleus sampling. Keep 1 with `rollout_backend: vllm` (below 1 the engine reports the truncated "
             "distribution's log-probs).",
    "clip_eps_low": "Lower PPO clip range epsilon (ratio >= 1 - clip_eps_low).",
    "entropy_coef": "Weight of an entropy bonus in the loss (0 = entropy is measured without a graph).",
    "gate_kwargs": "Keyword arguments per gate name, like `reward_kwargs`.",
    "offpolicy_weight_cap": "Cap of the `is` / `gap` per-token weights of `offpolicy_weighting`.",
    "distill_topk": "K of the `topk_logits` distillation (the teacher's top-K tokens plus one tail bin).",
    "distill_jsd_beta": "Mixing weight of the `jsd` divergence, in (0, 1).",
    "eval_batch_size": "Prompts per generate call in the held-out evaluation.",
    "checkpoint_every": "Write a checkpoint every N RL steps (also at every phase boundary).",
    "keep_checkpoints": "Newest checkpoints kept on disk (older ones are deleted).",
    "progress": "Show progress bars (`--no-progress` on the command line turns them off).",
    "phases.name": "A label for the phase in logs and `summary.json`.",
    "dynamic_sampling.enabled": "Turn dynamic sampling on.",
    "pass_rate_filter.enabled": "Turn the pass-rate filter on.",
    "low_variance_filter.enabled": "Turn the low-variance filter on.",
    "critic.temperature": "Sampling temperature of model critics (hf, openai).",
    "critic.max_tokens": "Most tokens of one model-written critique.",
    "critic.backoff_base_s": "First retry delay of the openai backend (doubles per retry, with jitter).",
    "critic.backoff_max_s": "Longest retry delay of the openai backend.",
    "critic.circuit_breaker_cooldown_s": "Seconds the open circuit breaker fails requests at once before a probe.",
    "memory.enabled": "Record episodes into the bank and retrieve from it (retrieval into prompts needs "
                      "`top_k_demos` / `top_k_lessons` > 0).",
    "memory.top_k_demos": "Demonstrations retrieved into each prompt (0 = none).",
    "memory.top_k_lessons": "Lessons retrieved into each prompt (0 = none).",
    "lora.enabled": "Train a LoRA adapter (extra `lora`, peft) instead of every weight.",
    "lora.dropout": "LoRA dropout.",
    "vllm.mode": "`colocate`: an engine inside each trainer process; `server`: a separately started `vllm serve`.",
    "vllm.tensor_parallel_size": "Tensor-parallel size of the colocated engine.",
}


def _source_class(cls: type) -> ast.ClassDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef), cls
    return node


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: the string literal declared right after it}."""
    node = _source_class(cls)
    docs: dict[str, str] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and i + 1 < len(body):
            nxt = body[i + 1]
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_groups(cls: type) -> list[tuple[str | None, list[str]]]:
    """Fields in declaration order, grouped by the ``# --- name ---`` comments above them (None: no group)."""
    src_lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    node = _source_class(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    groups: list[tuple[str | None, list[str]]] = [(None, [])]
    last_line = 0
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if stmt.target.id not in names:
            continue
        for line in src_lines[last_line:stmt.lineno - 1]:
            m = re.match(r"\s*#\s*---\s*(.+?)\s*-*\s*$", line)
            if m:
                groups.append((m.group(1), []))
        groups[-1][1].append(stmt.target.id)
        last_line = stmt.lineno
    return [(title, fields) for title, fields in groups if fields]


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    """Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _section_table(cls: type, prefix: str, hints: dict[str, Any], fields: list[str]) -> list[str]:
    docs = field_docs(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    out = ['<div class="config-ref" markdown>', "", "| key | type, default | what it does |", "|---|---|---|"]
    for name in fields:
        f = by_name[name]
        tp = hints.get(name, f.type)
        if dataclasses.is_dataclass(tp) or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            doc = docs.get(name, "") or (tp.__doc__ or "").strip().splitlines()[0]
            doc = f"{doc} See [`{prefix}{name}:`](#{_anchor(prefix + name)})."
        else:
            doc = docs.get(name) or FALLBACK_DOCS.get(prefix.replace("[i]", "") + name, "")
        out.append(f"| `{prefix}{name}` | {_cell(_type_name(tp))}<br>{_cell(_default(f))} | {_cell(doc) or '-'} |")
    out += ["", "</div>"]
    return out


def _anchor(key: str) -> str:
    return "section-" + re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def _nested(cls: type) -> list[tuple[str, type]]:
    """(field name, dataclass type) of the nested sections of ``cls``, lists of sections included."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        args = typing.get_args(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            found.append((f.name, tp))
        elif typing.get_origin(tp) is list and args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            found.append((f.name, args[0]))
    return found


def render() -> str:
    """The whole configuration reference page as Markdown."""
    from critique_rl.config import TrainConfig

    out = [_INTRO]
    hints = typing.get_type_hints(TrainConfig)
    out.append("## Top-level keys (`TrainConfig`)\n")
    for title, fields in field_groups(TrainConfig):
        out.append(f"### {title[0].upper() + title[1:] if title else 'General'}\n")
        out.extend(_section_table(TrainConfig, "", hints, fields))
        out.append("")
    for name, cls in _nested(TrainConfig):
        is_list = typing.get_origin(hints[name]) is list
        doc = inspect.cleandoc(cls.__doc__ or "")
        out.append(f'## `{name}:` (`{cls.__name__}`) {{ #{_anchor(name)} }}\n')
        if doc and not doc.startswith(cls.__name__ + "("):
            out.append(doc + "\n")
        if is_list:
            out.append(f"A list; every item is a mapping with these keys (`{name}[i].<key>`).\n")
        sub_hints = typing.get_type_hints(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        out.extend(_section_table(cls, f"{name}[i]." if is_list else f"{name}.", sub_hints, fields))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def undocumented() -> list[str]:
    """Keys whose field has no docstring (listed so they can be documented; they still appear on the page)."""
    from critique_rl.config import TrainConfig

    missing = [name for name in (f.name for f in dataclasses.fields(TrainConfig))
               if name not in field_docs(TrainConfig) and name not in dict(_nested(TrainConfig))]
    for sec, cls in _nested(TrainConfig):
        docs = field_docs(cls)
        missing += [f"{sec}.{f.name}" for f in dataclasses.fields(cls) if f.name not in docs]
    return missing


# --- MkDocs hook ---------------------------------------------------------------------------------------------

def on_files(files: Any, config: Any) -> Any:
    """Add the generated configuration page to the build (it is not a file in docs/)."""
    from mkdocs.structure.files import File

    existing = files.get_file_from_path(PAGE)
    if existing is not None:
        files.remove(existing)
    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    page = render()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
