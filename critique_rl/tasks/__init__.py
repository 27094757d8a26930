"""Built-in verifiable tasks and the registry for user tasks."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from critique_rl.errors import UserError
from critique_rl.primitives import final_answer_span, parse_number
from critique_rl.registry import Registry
from critique_rl.tasks.arithmetic import ADDITION, CARRY_ADDITION
from critique_rl.tasks.base import Example, Task
from critique_rl.tasks.confidence import ADDITION_CONF
from critique_rl.tasks.constraints import CONSTRAINTS, CONSTRAINTS_PLATEAU
from critique_rl.tasks.experience import EXPERIENCE
from critique_rl.tasks.mixture import SEPARATOR, mix_tasks
from critique_rl.tasks.open_ended import DIGIT_SUM
from critique_rl.tasks.strings import REVERSE
from critique_rl.tasks.trap import TRAP, TRAP_HALF, TRAP_PLATEAU, TRAP_PLATEAU_ONLY

TASKS: Registry[Task] = Registry("task", "task", {t.name: t for t in (
    ADDITION, CARRY_ADDITION, REVERSE, ADDITION_CONF, TRAP, TRAP_PLATEAU, TRAP_PLATEAU_ONLY, TRAP_HALF)})
TASKS.register(DIGIT_SUM.name, DIGIT_SUM)  # open-ended: many valid answers, a rule judge, no reference answer
TASKS.register(EXPERIENCE.name, EXPERIENCE)  # per-entity facts learnable only from earlier episodes (memory)
for _constraints_task in (CONSTRAINTS, CONSTRAINTS_PLATEAU):  # many valid answers, the verifier says what is wrong
    TASKS.register(_constraints_task.name, _constraints_task)


def register_task(task: Task) -> Task:
    """Make ``task`` available by name (``task: <name>`` in a config) without editing the package. A name
    already registered to another task raises :class:`~critique_rl.registry.DuplicateNameError`."""
    return TASKS.register(task.name, task)


def get_task(name: str) -> Task:
    """A built-in or registered task by name; ``"a+b"`` is the mixture of tasks ``a`` and ``b``
    (:func:`~critique_rl.tasks.mixture.mix_tasks`)."""
    if name not in TASKS and SEPARATOR in name:
        return mix_tasks([get_task(part.strip()) for part in name.split(SEPARATOR)])
    if name not in TASKS:
        raise UserError(f"config field 'task' = {name!r}: unknown task; choose one of {sorted(TASKS)} "
                        "or register yours with critique_rl.tasks.register_task")
    return TASKS[name]


def load_callable(spec: str, what: str = "verifier") -> Callable:
    """Load ``pkg.module:attr`` or ``path/to/file.py:attr``. The spec comes from the user's own config."""
    if ":" not in spec:
        raise UserError(f"{what} '{spec}' must look like 'package.module:function' or 'file.py:function'")
    mod_name, attr = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise UserError(f"{what} file '{mod_name}' does not exist")
            mspec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mspec)
            assert mspec.loader is not None
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UserError(f"{what} '{spec}': cannot import '{mod_name}' ({exc})") from None
    except UserError:
        raise
    except (Exception, SystemExit) as exc:  # the user's module failed while importing: one block, their frames
        from critique_rl.user_code import import_error
        raise import_error(spec, what, exc) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{what} '{spec}': '{attr}' is not a callable in '{mod_name}'")
    return fn


__all__ = ["TASKS", "Example", "Task", "final_answer_span", "get_task", "load_callable", "mix_tasks",
           "parse_number", "register_task"]
