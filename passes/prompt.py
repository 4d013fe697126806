"""Prompt tuning: n trainable virtual-token embeddings before the real tokens (Lester et al., 2021).

The rewrite is on the whole graph, not a wrapper around the model. With ``P`` the (n, D) virtual
tokens, ``E`` the token-embedding lookup on ``input_ids`` and ``S`` the input sequence length:

    embedding(W, input_ids)   (B, S, D)  ->  cat([expand(P, B), embedding(W, input_ids)], 1)  # (B, n+S, D)
    attention_mask            (B, S)     ->  cat([ones(B, n), attention_mask], 1)             # (B, n+S)
    token_type_ids            (B, S)     ->  cat([zeros(B, n), token_type_ids], 1)
    labels                    (B, S)     ->  cat([full(B, n, -100), labels], 1)   # ignored by the loss
    position_ids              (B, S)     ->  cat([arange(n), position_ids + n], 1)
    ne(input_ids, pad)        (B, S)     ->  full(B, n+S, True)   when another lookup's indices (positions)
                                             are computed from it (RoBERTa, XLM-R, MPNet: see below)
    sym_size(x, 1) = S                   ->  S + n   for every use outside the input_ids lookup

Each ``cat([prefix, x], 1)`` is inserted as ``slice_scatter(cat([prefix, x], 1), x, 1, n)`` (same
values) so that the join's base ``x`` is one of its direct arguments.

This is exactly what PEFT does (``inputs_embeds = cat(prompts, embeds)``, ``attention_mask =
cat(ones, mask)``): every size derived from the sequence (position ids, buffered token-type ids,
causal-mask construction, head reshapes) sees ``n + S``, so positions run ``0 .. n+S-1``; only ops
on ``input_ids`` itself (e.g. GPT-2's ``input_ids.view(-1, S)``) keep ``S``. Position ids computed from
``input_ids`` (RoBERTa's ``cumsum(input_ids != pad) * (input_ids != pad) + pad``) are, in the model's
``inputs_embeds`` path that PEFT calls, sequential over all n+S positions (``pad+1 .. pad+n+S``,
``create_position_ids_from_inputs_embeds``: no token counts as padding): the padding test the positions
are computed from is replaced by "every position is a token", widened to n+S, and the ops after it
(cumsum, the buffered token-type gather) follow. Every changed value is a
join over the old one (the slice_scatter, ``S + n``, the output slice), so disabling the adapter
gives the base graph exactly.

Outputs keep the model's structure, but sequence outputs (``last_hidden_state``, ``logits``, a T5
encoder's hidden states) gain n leading positions, as PEFT's do. ``strip=true`` slices them off again
(``out[:, n:]``, a join on each sequence output). Encoder-decoder models get the prompt on the
encoder only (PEFT's ``num_transformer_submodules=1``). Needs a dynamically traced graph (the
default), since the length must stay symbolic.

Initialisation (``init=``): ``random`` ~ N(0, 1) (PEFT's RANDOM: ``nn.Embedding``'s default),
``vocab`` (n rows of the token-embedding matrix sampled with ``seed``; PEFT's SAMPLE_VOCAB) or
``text:"Classify if ..."`` (the tokenised text, with special tokens as PEFT does, tiled or truncated
to n; needs ``tokenizer=DIR``, loaded offline with ``transformers.AutoTokenizer``; PEFT's TEXT).

PEFT interop: PEFT stores one ``prompt_embeddings`` (n, D) tensor; :func:`peft_import` /
:func:`peft_export` convert it to and from this pass's ``embedding`` parameter.
"""
from __future__ import annotations

import math
import operator
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from graftlib.editor import Editor, escape, graft_tag, is_join
from graftlib.errors import GraftError, LoadError
from graftlib.io import restoring
from graftlib.registry import Method, Option, positive, register
from graftlib.select import Selection, SiteIndex
from graftlib.sites import Site, _walk_back, weight_value
from graftlib.spec import GraftCall, Prefixed

__all__ = ["Prompt", "VirtualTokens", "peft_import", "peft_export", "virtual_tokens_value", "site_params",
           "peft_base_config", "input_anchor"]

aten = torch.ops.aten
_MAX = sys.maxsize
_INITS = ("random", "vocab")


# -- graph helpers ---------------------------------------------------------------------------------
def input_anchor(index: SiteIndex, site: Site) -> tuple[fx.Node, fx.Node]:
    """The lookup node of `site` fed by the ``input_ids`` placeholder, and that placeholder."""
    for node in index.anchors.get(site.key, []):
        source = _walk_back(node.args[1])
        if isinstance(source, fx.Node) and source.op == "placeholder":
            return node, source
    raise GraftError(f"{site.key} has no embedding lookup fed by a graph input")


def _token_embedding(index: SiteIndex) -> tuple[Site, fx.Node, fx.Node] | None:
    """The token-embedding site (role ``embed``), preferring the one fed by ``input_ids`` exactly."""
    found = []
    for site in index.sites:
        if site.kind == "embedding" and site.role == "embed":
            node, source = input_anchor(index, site)
            found.append((source.name != "input_ids", site, node, source))
    if not found:
        return None
    found.sort(key=lambda item: item[0])
    _, site, node, source = found[0]
    return site, node, source


def _scope(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else None


def _module_output(lookup: fx.Node) -> fx.Node:
    """The embedding module's output: the lookup, or the ops after it inside the same module that keep
    its shape (Gemma's scaled embedding multiplies by sqrt(D) inside the module). Virtual tokens join
    there, as PEFT's ``inputs_embeds`` would: after the module, unscaled."""
    node, scope = lookup, _scope(lookup)
    shape = getattr(lookup.meta.get("val"), "shape", None)
    while scope is not None and len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function" or _scope(user) != scope or \
                getattr(user.meta.get("val"), "shape", None) != shape:
            break
        node = user
    return node


def _expr(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else None


def _seq_expr(placeholder: fx.Node) -> Any:
    val = placeholder.meta.get("val")
    return _expr(val.shape[1]) if isinstance(val, torch.Tensor) and val.dim() >= 2 else None


def _has_seq_dim(node: fx.Node, seq: Any) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() >= 2 and _expr(val.shape[1]) == seq


def _is_graft(node: fx.Node) -> bool:
    return graft_tag(node) is not None


def _seq_sizes(graph: fx.Graph, seq: Any) -> list[fx.Node]:
    """The base graph's ``sym_size.int`` nodes whose value is the input sequence length."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target == aten.sym_size.int
            and not _is_graft(n) and _expr(n.meta.get("val")) == seq]


def _input_region(ids: fx.Node, anchor: fx.Node, stop: frozenset[fx.Node] = frozenset()) -> set[fx.Node]:
    """Tensor ops computed from ``input_ids`` before the lookup (not through `stop`): they keep the original
    length."""
    region, frontier = set(), [ids]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user is anchor or user in region or user in stop or user.op != "call_function" or is_join(user):
                continue  # a join (LoRA on the lookup) is the lookup's value, not the input's
            if isinstance(user.meta.get("val"), torch.Tensor):
                region.add(user)
                frontier.append(user)
    return region


def _padding_tests(ids: fx.Node, anchor: fx.Node) -> frozenset[fx.Node]:
    """``input_ids != c`` / ``== c`` from which another embedding lookup's indices are computed (the padding
    test of RoBERTa-style position ids)."""
    tests = set()
    for user in ids.users:
        if user.target in (aten.ne.Scalar, aten.eq.Scalar) and not is_join(user):
            reached = _input_region(user, anchor)
            if any(n.target == aten.embedding.default and n.args[1] in reached | {user} for n in reached):
                tests.add(user)
    return frozenset(tests)


def _after(node: fx.Node) -> fx.Node:
    """The node to insert before so new nodes come right after `node` (after all placeholders)."""
    if node.op == "placeholder":
        return [n for n in node.graph.nodes if n.op == "placeholder"][-1].next
    return node.next


def _join(editor: Editor, base: fx.Node, op: Any, *args: Any, keep: Any = None, **kwargs: Any) -> fx.Node:
    """``op(*args)`` as a join over `base`; users of `base` except `keep(user)` and new nodes move to it."""
    users = list(base.users)
    node = editor.call(op, *args, role="join", **kwargs)
    graft_tag(node)["base"] = next(i for i, a in enumerate(args) if a is base)
    inserted = set(editor.inserted)
    for user in users:
        if user not in inserted and user.op != "call_module" and not (keep and keep(user)):
            user.replace_input_with(base, node)
    return node


def _prepend_join(editor: Editor, base: fx.Node, prefix: fx.Node, n: int, keep: Any = None) -> fx.Node:
    """``cat([prefix, base], 1)`` as a join over `base`.

    Written ``slice_scatter(cat([prefix, base], 1), base, 1, n)`` (the same values) so that `base` is a
    direct argument of the join, which is what deactivation substitutes back. (``constant_pad_nd``
    would be one op, but its fake-tensor rule specialises symbolic sizes.)
    """
    widened = editor.call(aten.cat.default, [prefix, base], 1)
    node = _join(editor, base, aten.slice_scatter.default, widened, base, 1, n, _MAX, keep=keep)
    graft_tag(node)["widens"] = True  # additive branches on `base` join before it (join_chain_end)
    return node


def _is_encoder_decoder(graph: fx.Graph) -> bool:
    """Whether the graph has both encoder and decoder modules (T5, BART): labels are then decoder targets."""
    parts: set[str] = set()
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            parts.update(str(path).split("."))
    return {"encoder", "decoder"} <= parts


def _is_size(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == aten.sym_size.int


# -- the rewrite -------------------------------------------------------------------------------------
class VirtualTokens(Method):
    """Shared rewrite of prompt tuning and P-tuning; subclasses build the (n, D) virtual tokens."""

    needs_targets = False

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        if call.targets:
            raise call.error(f"{self.name}(...) takes no targets: the virtual tokens go before the "
                             f"input tokens, e.g. {self.name}(n=20)", call.targets[0].column)
        if config["layers"] is not None:
            raise call.option_error("layers", f"{self.name}(...) has no layers option: the prompt is "
                                    "prepended once, at the token embedding")

    def select(self, call: GraftCall, index: SiteIndex, config: dict[str, Any]) -> Selection:
        found = _token_embedding(index)
        if found is None:
            inputs = [n.name for n in index.graph_module.graph.nodes if n.op == "placeholder"]
            raise call.error(f"{self.name}(...) needs a token-embedding lookup fed by input_ids; this "
                             f"model has none (its inputs: {', '.join(inputs) or 'none'}). Prompt "
                             "methods apply to text models that take input_ids")
        site, _, ids = found
        if _seq_expr(ids) is None:
            raise call.error(f"{self.name}(...) needs a dynamically traced graph: the sequence length "
                             f"of {ids.name} was traced as a constant, and the prompt changes it. "
                             "Trace with dynamic=True (the default)")
        return Selection(call, [site], {"embed": [site.key]})

    def rewrite(self, editor: Editor, site: Site, config: dict[str, Any]) -> None:
        """Nothing per anchor: the whole-graph rewrite is in :meth:`rewrite_graph`."""

    def rewrite_graph(self, gm: fx.GraphModule, selection: Selection, config: dict[str, Any],
                      index: SiteIndex) -> None:
        site = selection.sites[0]
        anchor, ids = input_anchor(index, site)
        seq, n = _seq_expr(ids), config["n"]
        editor = Editor(gm, self.name, config["name"], site, anchor)
        placeholders = [p for p in gm.graph.nodes if p.op == "placeholder" and p is not ids]
        extended = [p for p in placeholders if _has_seq_dim(p, seq)]
        labels = next((p for p in placeholders if p.name == "labels" and p not in extended), None)
        lengths = {seq}
        if labels is not None and _seq_expr(labels) is not None and not _is_encoder_decoder(gm.graph):
            extended.append(labels)  # a causal LM's labels: HF relates their length to S only by a product
            lengths.add(_seq_expr(labels))
        sizes = [size for length in lengths for size in _seq_sizes(gm.graph, length)]
        tests = _padding_tests(ids, anchor)
        region = _input_region(ids, anchor, stop=tests)
        output = next(node for node in gm.graph.nodes if node.op == "output")
        outputs = [leaf for leaf in dict.fromkeys(_leaves(output.args)) if _has_seq_dim(leaf, seq)]
        for size in sizes:
            self._widen_size(editor, size, n, region)
        for placeholder in extended:
            self._pad_input(editor, placeholder, n)
        for test in tests:
            self._no_padding(editor, test, n)
        self._prepend(editor, site, anchor, config)
        if config["strip"]:
            self._strip(editor, output, outputs, n)

    @staticmethod
    def _widen_size(editor: Editor, size: fx.Node, n: int, region: set[fx.Node]) -> None:
        base = editor.value_at(size)
        with editor.before(_after(base)):
            _join(editor, base, operator.add, base, n, keep=lambda user: user in region)

    @staticmethod
    def _no_padding(editor: Editor, test: fx.Node, n: int) -> None:
        """``input_ids != pad`` (B, S) -> True (B, n + S) (``== pad``: False): every position is a token, as
        when the model is called with ``inputs_embeds``; two joins, so deactivation restores the test."""
        token = test.target == aten.ne.Scalar
        with editor.before(_after(test)):
            filled = _join(editor, test, aten.fill.Scalar, test, token)                       # (B, S)
            batch = editor.call(aten.sym_size.int, test, 0)
            prefix = editor.call(aten.full.default, [batch, n], token, dtype=torch.bool)    # (B, n)
            _prepend_join(editor, filled, prefix, n)                                        # (B, n + S)

    def _pad_input(self, editor: Editor, placeholder: fx.Node, n: int) -> None:
        name = placeholder.name
        base = editor.value_at(placeholder)
        keep = _is_size if base is placeholder else None  # sizes are widened by _widen_size
        fills = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}
        fill = next((v for k, v in fills.items() if k in name), None)
        with editor.before(_after(base)):
            batch = editor.call(aten.sym_size.int, base, 0)
            if fill is not None:  # (B, S) -> (B, n + S), n x fill first
                prefix = editor.call(aten.full.default, [batch, n], fill, dtype=placeholder.meta["val"].dtype)
                _prepend_join(editor, base, prefix, n, keep=keep)
            elif "position_ids" in name:  # (B, S) -> (B, n + S): 0 .. n-1, then position + n
                shifted = _join(editor, base, aten.add.Tensor, base, n, keep=keep)
                ramp = editor.call(aten.arange.default, n, dtype=placeholder.meta["val"].dtype)
                prefix = editor.call(aten.expand.default, editor.call(aten.unsqueeze.default, ramp, 0), [batch, n])
                _prepend_join(editor, shifted, prefix, n)
            else:
                raise GraftError(
                    f"{self.name}(...) does not know how to extend the input {name!r} (its dim 1 is the "
                    "sequence length): it handles attention_mask, token_type_ids, position_ids and "
                    "labels. Trace without it")

    def _prepend(self, editor: Editor, site: Site, anchor: fx.Node, config: dict[str, Any]) -> None:
        anchor = _module_output(anchor)
        base = editor.value_at(anchor)
        with editor.before(_after(base)):
            tokens = self.virtual_tokens(editor, site, config)  # (n, D)
            graft_tag(tokens)["tokens"] = True
            dtype = getattr(anchor.meta.get("val"), "dtype", torch.float32)
            if dtype != torch.float32:
                tokens = editor.call(aten._to_copy.default, tokens, dtype=dtype)
            batch = editor.call(aten.sym_size.int, base, 0)
            tokens = editor.call(aten.unsqueeze.default, tokens, 0)               # (1, n, D)
            tokens = editor.call(aten.expand.default, tokens, [batch, -1, -1])   # (B, n, D)
            _prepend_join(editor, base, tokens, config["n"])                     # (B, n + S, D)

    @staticmethod
    def _strip(editor: Editor, output: fx.Node, outputs: list[fx.Node], n: int) -> None:
        with editor.before(output):
            for leaf in outputs:
                sliced = _join(editor, leaf, aten.slice.Tensor, leaf, 1, n, _MAX,
                               keep=lambda user: user is not output)
                sliced.meta["val"] = leaf.meta["val"]  # the output's length is the input's again

    def virtual_tokens(self, editor: Editor, site: Site, config: dict[str, Any]) -> fx.Node:
        raise NotImplementedError


def _leaves(value: Any) -> Iterator[fx.Node]:
    if isinstance(value, fx.Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)


# -- initialisation ----------------------------------------------------------------------------------
def _text_ids(text: str, tokenizer: str, n: int) -> list[int]:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / others for a bad directory
        raise GraftError(f"init=text:... could not load a tokenizer from tokenizer={tokenizer!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass "
                         "the directory of a saved tokenizer (tokenizer.save_pretrained(DIR))") from None
    ids = list(tok(text)["input_ids"])
    if not ids:
        raise GraftError(f"init=text:{text!r} tokenises to no tokens; give a longer text")
    return (ids * math.ceil(n / len(ids)))[:n]  # tile, then truncate, to n (PEFT's rule)


def prompt_init(config: dict[str, Any], table: torch.Tensor) -> torch.Tensor:
    """The (n, D) initial virtual tokens for ``init=`` over the token-embedding `table` (vocab, D)."""
    n, init = config["n"], config["init"]
    if isinstance(init, Prefixed) and restoring():  # graftlib.load: the saved tokens replace these
        return torch.zeros(n, table.shape[1])
    generator = torch.Generator().manual_seed(config["seed"])
    table = table.detach().float()
    if init == "random":
        return torch.randn(n, table.shape[1], generator=generator)
    if init == "vocab":
        rows = torch.randint(0, table.shape[0], (n,), generator=generator)
        return table[rows].clone()
    ids = torch.tensor(_text_ids(init.text, config["tokenizer"], n))
    if int(ids.max()) >= table.shape[0]:
        raise GraftError(f"the tokenizer {config['tokenizer']!r} gives token id {int(ids.max())}, beyond "
                         f"this model's vocabulary of {table.shape[0]}: use the model's own tokenizer")
    return table[ids].clone()


def _check_init(call: GraftCall, config: dict[str, Any]) -> None:
    init = config["init"]
    if isinstance(init, Prefixed):
        if init.prefix != "text":
            raise call.option_error("init", f"init={init.prefix}:... is unknown; use random, vocab or "
                                    'text:"some words"')
        if not config["tokenizer"]:
            raise call.option_error("init", 'init=text:"..." needs tokenizer=DIR (a saved tokenizer '
                                    "directory, loaded offline with transformers.AutoTokenizer)")
    elif init not in _INITS:
        raise call.option_error("init", f'init={init!r} is unknown; use random, vocab or text:"some words"')


@register
class Prompt(VirtualTokens):
    name = "prompt"
    options = {
        "n": Option(20, (int,), positive, help="number of virtual tokens"),
        "init": Option("random", (str, Prefixed), help='random | vocab | text:"..."'),
        "tokenizer": Option(None, (str,), help="tokenizer directory for text init"),
        "seed": Option(0, (int,), help="seed of random / vocab init"),
        "strip": Option(False, (bool,), help="slice the n virtual positions off sequence outputs"),
    }

    def validate(self, call: GraftCall, config: dict[str, Any]) -> None:
        super().validate(call, config)
        _check_init(call, config)

    def virtual_tokens(self, editor: Editor, site: Site, config: dict[str, Any]) -> fx.Node:
        table = weight_value(editor.gm, site.weight)
        return editor.param("embedding", lambda: prompt_init(config, table))  # (n, D)


# -- values, freezing, PEFT interop --------------------------------------------------------------------
def _tokens_node(graph: fx.Graph, adapter: str) -> fx.Node:
    for node in graph.nodes:
        tag = graft_tag(node)
        if tag and tag.get("adapter") == adapter and tag.get("tokens"):
            return node
    raise GraftError(f"adapter {adapter!r} has no virtual-token node in this graph")


def virtual_tokens_value(grafted: Any, adapter: str) -> torch.Tensor:
    """The (n, D) virtual tokens of `adapter` as the graph computes them in eval mode (no dropout)."""
    source = grafted.graph
    tokens = _tokens_node(source, adapter)
    needed, frontier = {tokens}, [tokens]
    while frontier:
        for node in frontier.pop().all_input_nodes:
            if node.op == "placeholder":
                raise GraftError(f"the virtual tokens of {adapter!r} depend on the input {node.name}")
            if node not in needed:
                needed.add(node)
                frontier.append(node)
    graph, env = fx.Graph(), {}
    for node in source.nodes:
        if node not in needed:
            continue
        if node.op == "call_function" and node.target == aten.dropout.default:
            env[node] = env[node.args[0]]
        else:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(env[tokens])
    with torch.no_grad():
        return fx.GraphModule(grafted.graph_module, graph)().detach().clone()


def _task_type(grafted: Any) -> str:
    name = grafted._traced.model_class
    config = grafted._traced.config
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if getattr(config, "is_encoder_decoder", False) and name.endswith(("ForConditionalGeneration", "Seq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    return "FEATURE_EXTRACTION"


def peft_base_config(grafted: Any, record: Any, peft_type: str, token_dim: int) -> dict[str, Any]:
    """The PromptLearningConfig fields PEFT's adapter_config.json needs."""
    config = grafted._traced.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> Any:
        return next((getattr(text, k) for k in names if getattr(text, k, None) is not None), None)

    return {
        "peft_type": peft_type,
        "task_type": _task_type(grafted),
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": record.config["n"],
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": first("num_attention_heads", "n_head", "num_heads"),
        "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "modules_to_save": None,
        "auto_mapping": None,
    }


def peft_export(grafted: Any, record: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's adapter_config.json dict and state dict (``prompt_embeddings`` (n, D)) for a prompt graft."""
    tokens = virtual_tokens_value(grafted, record.adapter).float().contiguous()
    config = peft_base_config(grafted, record, "PROMPT_TUNING", tokens.shape[1])
    init = record.config["init"]
    is_text = isinstance(init, Prefixed) or (isinstance(init, str) and init.startswith("text"))
    config.update({
        "prompt_tuning_init": "TEXT" if is_text else {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}[init],
        "prompt_tuning_init_text": init.text if isinstance(init, Prefixed) else None,
        "tokenizer_name_or_path": record.config.get("tokenizer") if is_text else None,
        "tokenizer_kwargs": None,
    })
    return config, {"prompt_embeddings": tokens}


def _embedding_path(model: Any) -> str:
    """The module path the token-embedding site gets (the calling module's: T5's encoder.embed_tokens)."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    modules = list(model.named_modules(remove_duplicate=False))
    if table is None:
        embeddings = {id(m) for _, m in modules if isinstance(m, nn.Embedding)}
        if len(embeddings) != 1:
            raise LoadError(f"cannot tell which embedding of {type(model).__name__} is the token embedding "
                            "(it has no get_input_embeddings()); graft the prompt with prompt(n=N) and copy "
                            "the tensor into it")
        table = next(m for _, m in modules if id(m) == embeddings.pop())
    paths = [name for name, module in modules if module is table]
    return next((p for p in paths if "encoder" in p.split(".")), paths[0])


def peft_import(config: dict[str, Any], state: dict[str, torch.Tensor], model: Any
                ) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT prompt-tuning (or P-tuning: its saved ``prompt_embeddings`` are the encoder's output)
    checkpoint as ``("prompt(n=N)", {<token-embedding site key>: {"embedding": (n, D) tensor}})``."""
    kind = config.get("peft_type")
    if kind not in ("PROMPT_TUNING", "P_TUNING"):
        raise LoadError(f"peft_type {kind!r} is not prompt tuning or P-tuning")
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise LoadError(f"this {kind} checkpoint has num_transformer_submodules="
                        f"{config['num_transformer_submodules']} (prompts on the decoder too); graftlib "
                        "prompts the encoder only (num_transformer_submodules=1)")
    if "prompt_embeddings" not in state:
        raise LoadError(f"the {kind} state dict has no 'prompt_embeddings' tensor (keys: {sorted(state)[:5]})")
    tokens = state["prompt_embeddings"]
    n = config.get("num_virtual_tokens")
    if tokens.dim() != 2 or (n is not None and tokens.shape[0] != n):
        raise LoadError(f"prompt_embeddings has shape {tuple(tokens.shape)}; expected ({n}, token_dim)")
    path = _embedding_path(model)
    dim = getattr(model.get_submodule(path), "embedding_dim", None)
    if dim is not None and tokens.shape[1] != dim:
        raise LoadError(f"prompt_embeddings has width {tokens.shape[1]} but the model's token embeddings "
                        f"have {dim}: the checkpoint is for another base model")
    return f"prompt(n={tokens.shape[0]})", {path: {"embedding": tokens.detach().float().clone()}}


def site_params(grafted: Any, adapter: str) -> Any:
    """The store holder of `adapter`'s single site (its parameters by name)."""
    record = grafted.adapters[adapter]
    return grafted.store[adapter][escape(record.sites[0])]
