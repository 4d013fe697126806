"""Chains: the nodes a graft inserted at a site, as drawn steps ``linear(x,A) -> linear(.,B) -> add``.

ONNX nodes lowered from one aten op form one step; arguments become tokens: ``.`` (the previous step),
``%k`` (step k), a parameter's short name (``A``), a constant, or ``x`` / ``base`` for values from outside.
"""
from __future__ import annotations

from .model import ChainItem, SiteDiff
from .views import _Node, _short, _View

__all__ = ["chain"]


def _param_token(node: _Node, method: str | None) -> str:
    name = str((node.tag or {}).get("param") or node.target.rsplit(".", 1)[-1])
    if method and name.startswith(method + "_") and len(name) > len(method) + 1:
        return name[len(method) + 1:]
    return name


def _steps(view: _View, members: list[int]) -> list[list[int]]:
    """Inserted nodes grouped into drawn steps (ONNX nodes lowered from one aten op form one step)."""
    steps: list[list[int]] = []
    for i in members:
        node = view.nodes[i]
        if node.kind != "call" or (node.value is not None and node.op == "Constant"):
            continue
        if steps and node.origin and view.nodes[steps[-1][-1]].origin == node.origin:
            steps[-1].append(i)
        else:
            steps.append([i])
    return steps


def chain(view: _View, ids: list[str], members: list[int], site: SiteDiff) -> list[ChainItem]:
    steps = _steps(view, members)
    step_of = {i: k for k, step in enumerate(steps) for i in step}
    externals: dict[int, str] = {}
    items = []
    for k, step in enumerate(steps):
        tokens: list[tuple[str, str]] = []
        inputs: list[str] = []
        for i in step:
            for arg in _step_args(view, i, step):
                if arg == view.nodes[i].join_base and arg not in step_of:
                    inputs.append(ids[arg])       # the main path this branch re-enters
                    continue
                kind, text, source = _token(view, arg, k, step_of, externals, site)
                if text:
                    tokens.append((kind, text))
                if source is not None:
                    inputs.append(ids[steps[step_of[source]][-1]] if source in step_of else ids[source])
        last = view.nodes[step[-1]]
        if last.origin:  # ONNX: Transpose(A) then MatMul(x, .) reads better as linear(x,A)
            tokens.sort(key=lambda token: token[0] == "param")
        op = _short(last.origin_op or last.op)
        items.append(ChainItem(_step_label(op, tokens), last.origin_op or last.op, [ids[i] for i in step],
                               list(dict.fromkeys(inputs)), (last.tag or {}).get("role")))
    return items


def _step_args(view: _View, i: int, step: list[int]) -> list[int | str]:
    """Arguments of node `i` that come from outside its step."""
    inside = set(step)
    return [a for a in view.nodes[i].args if not (isinstance(a, int) and a in inside)]


def _token(view: _View, arg: int | str, k: int, step_of: dict[int, int], externals: dict[int, str],
           site: SiteDiff) -> tuple[str, str, int | None]:
    """(kind, text, source node) of one argument: kind is prev / ref / param / const / value."""
    if isinstance(arg, str):
        return "const", arg, None
    node = view.nodes[arg]
    if arg in step_of:
        return ("prev", ".", arg) if step_of[arg] == k - 1 else ("ref", f"%{step_of[arg] + 1}", arg)
    if node.kind == "param":
        return "param", _param_token(node, site.method), arg
    if node.value is not None:
        return "const", node.value, None
    if node.kind == "call" and node.tag and node.tag.get("adapter") == site.adapter:
        return "const", "", None      # an inserted helper of this branch without a value
    if arg not in externals:
        stem = "base" if node.module == site.path else "x"
        n = sum(1 for v in externals.values() if v.rstrip("0123456789") == stem)
        externals[arg] = stem if n == 0 else f"{stem}{n + 1}"
    kind = "prev" if externals[arg] == "base" else "ref"
    return kind, externals[arg], arg


def _step_label(op: str, tokens: list[tuple[str, str]]) -> str:
    """``linear(x,A)``; a step that only continues the chain shows its constants: ``mul 2.0``, ``add``."""
    if all(kind in ("prev", "const") for kind, _ in tokens):
        return " ".join([op] + [text for kind, text in tokens if kind == "const"])
    return f"{op}({','.join(text for _, text in tokens)})"
