"""Names that reach generated code: one rule for adapter names, safe attribute paths for everything else.

torch.fx writes every ``get_attr`` / ``call_module`` target into the graph module's Python source:
``getattr(self, "<atom>")`` for an atom that is not an identifier, unescaped. A name with a quote in it
is therefore code. graftlib never lets text it did not check reach that source:

- adapter names (spec ``name=``, ``graft.json``, PEFT ``adapter_name=``, ``combine(name=)``) must match
  ``ADAPTER_NAME`` -- ``[A-Za-z_][A-Za-z0-9_-]{0,63}``, not a Python keyword and not an attribute of the
  adapter store -- checked at the boundary with a clear error;
- every target of a traced graph whose atoms are not ``[A-Za-z0-9_-]+`` (a user's module registered as
  ``'a"b'``) is moved to a generated name (``_graft_attr_<n>``) before any code is generated;
- the editor checks each target it creates with :func:`safe_target` (a last line of defence).
"""
from __future__ import annotations

import keyword
import re
from typing import Any

from torch import fx, nn

from .errors import GraftError

__all__ = ["ADAPTER_NAME", "MAX_NAME_LENGTH", "adapter_name_problem", "check_adapter_name", "name_check",
           "original_path", "safe_atom", "safe_target", "sanitize_program",
           "sanitize_targets"]

MAX_NAME_LENGTH = 64
ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_ATOM = re.compile(r"[A-Za-z0-9_-]+")
_RESERVED = frozenset({"__base__"})
_STORE_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))  # names ModuleDict refuses as keys
_PREFIX = "_graft_attr_"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "...' (" + str(len(str(value))) + " characters)"


def adapter_name_problem(name: Any) -> str | None:
    """Why `name` is not a valid adapter name (None when it is)."""
    if not isinstance(name, str):
        return f"adapter name {_shown(name)} must be a string"
    if not ADAPTER_NAME.fullmatch(name):
        if len(name) > MAX_NAME_LENGTH:
            return f"adapter name {_shown(name)} is longer than {MAX_NAME_LENGTH} characters"
        return (f"adapter name {_shown(name)} is not allowed: use 1-{MAX_NAME_LENGTH} ASCII letters, digits, "
                "'_' or '-', starting with a letter or '_' (e.g. task_a)")
    if keyword.iskeyword(name) or name in _RESERVED or name in _STORE_ATTRIBUTES:
        return f"adapter name {name!r} is reserved: choose another, e.g. {name.strip('_')}_adapter"
    return None


def name_check(name: Any) -> str | None:
    """The ``name=`` option's check (registry.Option): what is wrong, or None."""
    problem = adapter_name_problem(name)
    return None if problem is None else "is refused: " + problem


def check_adapter_name(name: Any, error: type[GraftError] = GraftError) -> str:
    """`name` if it is a valid adapter name, else raise `error` saying what is allowed."""
    problem = adapter_name_problem(name)
    if problem:
        raise error(problem)
    return name


def safe_atom(atom: str) -> bool:
    """Whether `atom` can be one dotted part of a generated attribute path (``self.<atom>`` or
    ``getattr(self, "<atom>")``) without being code."""
    return bool(_ATOM.fullmatch(atom)) and not keyword.iskeyword(atom)


def safe_target(target: Any) -> bool:
    return isinstance(target, str) and all(safe_atom(a) for a in target.split("."))


def _owner(root: nn.Module, target: str) -> tuple[Any, str]:
    *path, leaf = target.split(".")
    owner: Any = root
    for atom in path:
        owner = getattr(owner, atom)
    return owner, leaf


def sanitize_program(program: Any) -> dict[str, str]:
    """Rename the state of an ExportedProgram whose paths have unsafe atoms (a user's module registered as
    ``'a"b'``), before ``program.module()`` generates code from them. Returns {old atom: new atom}; the
    graph's ``nn_module_stack`` keeps the user's paths (they are data: site paths, never code)."""
    signature = program.graph_signature
    specs = [s for s in (*signature.input_specs, *signature.output_specs) if isinstance(s.target, str)]
    paths = [s.target for s in specs] + list(program.state_dict) + list(program.constants)
    atoms = {a for path in paths for a in path.split(".")}
    unsafe = sorted(a for a in atoms if not safe_atom(a))
    if not unsafe:
        return {}
    mapping: dict[str, str] = {}
    for atom in unsafe:
        new, k = f"{_PREFIX}{len(mapping)}", len(mapping)
        while new in atoms:
            k += 1
            new = f"{_PREFIX}{k}"
        mapping[atom] = new
        atoms.add(new)

    def fix(path: str) -> str:
        return ".".join(mapping.get(a, a) for a in path.split("."))

    for spec in specs:
        spec.target = fix(spec.target)
    for table in (program._state_dict, program._constants):
        for key in [k for k in table if fix(k) != k]:
            table[fix(key)] = table.pop(key)
    for entry in program.module_call_graph:
        entry.fqn = fix(entry.fqn)
    return mapping


ORIGINAL_ATOMS = "graftlib_original_atoms"  # gm.meta key: {generated atom: the user's module name}


def original_path(gm: fx.GraphModule, path: str) -> str:
    """`path` with generated atoms mapped back to the user's module names (data for sites, never code)."""
    atoms = getattr(gm, "meta", {}).get(ORIGINAL_ATOMS) or {}
    return ".".join(atoms.get(a, a) for a in path.split(".")) if atoms and path else path


def sanitize_targets(gm: fx.GraphModule, program_renames: dict[str, str] | None = None) -> dict[str, str]:
    """Move every ``get_attr`` / ``call_module`` target of `gm` that is not a safe path to a generated
    root attribute, so no user-chosen text reaches the generated source. Returns {old: new}; the user's
    names (these and `program_renames` from :func:`sanitize_program`) are kept in ``gm.meta`` for
    :func:`original_path`."""
    if program_renames:
        gm.meta.setdefault(ORIGINAL_ATOMS, {}).update({new: old for old, new in program_renames.items()})
    renamed: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module") or safe_target(node.target):
            continue
        if node.target not in renamed:
            owner, leaf = _owner(gm, node.target)
            value = getattr(owner, leaf)
            new = f"{_PREFIX}{len(renamed)}"
            while hasattr(gm, new):
                new += "_"
            if isinstance(value, nn.Parameter):
                gm.register_parameter(new, value)
                del owner._parameters[leaf]
            elif leaf in getattr(owner, "_buffers", {}):
                gm.register_buffer(new, value, persistent=leaf not in owner._non_persistent_buffers_set)
                del owner._buffers[leaf]
            elif isinstance(value, nn.Module):
                gm.add_submodule(new, value)
                del owner._modules[leaf]
            else:
                setattr(gm, new, value)
                delattr(owner, leaf)
            renamed[node.target] = new
            gm.meta.setdefault(ORIGINAL_ATOMS, {})[new] = node.target
        node.target = renamed[node.target]
    if renamed:
        gm.recompile()
    return renamed
