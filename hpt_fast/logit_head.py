"""What a transformers causal LM does between its trunk and its logits, in the fused op's terms.

The op computes ``log_softmax(softcap(hidden @ W.T + b) / T)`` from the trunk's last hidden state.
Some transformers models transform the head's output before it is their logits:
- a constant factor ``s``: Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``, the Muse
  models' ``output_multiplier``, ``1 / logits_scaling`` for Granite and MiniCPM3 (which divide by
  it), ``logits_scaling`` for HyperCLOVA X (which multiplies), and ``1 / logits_mup_width_multiplier``
  for Inkling (which divides the hidden states by it; its head has no bias, so it is a logit factor);
- then a tanh soft cap ``c * tanh(z / c)``: ``final_logit_softcapping`` (Gemma 2 and later,
  Inkling 2, the Muse models after their factor), ``logits_soft_cap`` (RecurrentGemma),
  ``output_logit_soft_cap`` (xLSTM).
Sampling at temperature T from ``c * tanh(s z / c)`` is the op at soft cap ``c / s`` and
temperature ``T / s`` (``s > 0``). Where the forward's source can be read, it decides: a scale
field multiplies or divides as the source does, and a scale or cap field the forward never applies
on the way to its logits is not applied (transformers' MPT has ``logit_scale`` and ignores it);
where it cannot, the fields apply as the families above apply them. Inkling keeps only the first
``unpadded_vocab_size`` logits of a head padded with more rows: the op is given those rows of the
head (``LogitTransform.rows``). The
fields are read from the config and from its text config, where multimodal models keep them; the
list is what a search of transformers 5.24's causal-LM forwards found (``bench/family_sweep.py``
checks every family that builds against its own loss).

What the op cannot compute is refused rather than silently bypassed:
- a head that is not a plain ``nn.Linear`` (Dory's learned per-token scale, an adapter on ``lm_head``);
- a head that is not a child of the model beside its trunk: BERT-style prediction heads (BERT,
  RoBERTa, XLM ...) and ModernBERT's decoder transform the trunk's states before the output embedding;
- a forward that applies the head to another output of its trunk than the last hidden state
  (ProphetNet's n-gram predicting streams), or to a transform of it other than a cast, a reshape,
  a slice or a scale field above (MiniCPM's remote code divides it by ``hidden_size /
  dim_model_base``), or that transforms the head's output otherwise than by the scale and cap
  fields above (Phi-3-small's remote code divides its logits by ``mup_width_multiplier``), or
  applies a tanh under no cap field, reads a cap field without a tanh, or caps otherwise than as
  ``c * tanh(z / c)`` (a cap field divided into the tanh and multiplied out of it, or handed to a
  cap function whose own source computes that), found in its source; a forward that both
  multiplies and divides by one scale field; two scale or two cap fields that it applies (or,
  where its source cannot be read, that the config sets).
"""
from __future__ import annotations

import ast
import inspect
import math
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

# config fields that scale the logits (1.0 leaves them unchanged)
SCALE_FIELDS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier",
                 "logits_mup_width_multiplier")
# models whose logits_scaling multiplies the logits (Granite and MiniCPM3 divide by it)
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)
# config fields of a tanh soft cap on the logits
CAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


@dataclass(frozen=True)
class LogitTransform:
    """Logits = ``softcap * tanh(scale * lm_head(hidden)[..., :vocab] / softcap)`` (no tanh when
    softcap is None; every row of the head when vocab is None)."""

    scale: float = 1.0
    softcap: Optional[float] = None
    vocab: Optional[int] = None

    def rows(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The head's weight [V, H] and bias [V] (or None) cut to the rows the logits keep: views
        (a row slice of a contiguous weight stays contiguous), so gradients reach the whole head,
        zero in the rows cut, as they do through the model's own slice of its logits."""
        if self.vocab is None:
            return weight, bias
        return weight[: self.vocab], None if bias is None else bias[: self.vocab]

    def op_args(self, temperature: float = 1.0) -> dict[str, Any]:
        """The fused op's ``temperature`` and ``softcap`` for sampling temperature ``temperature``."""
        return {"temperature": temperature / self.scale,
                "softcap": None if self.softcap is None else self.softcap / self.scale}


def _configs(model: nn.Module) -> list[Any]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _field(configs: list[Any], name: str, neutral: Any = None) -> tuple[Any, Any]:
    """(value, config holding it) of the first config that sets ``name`` to neither None nor
    ``neutral``, or (None, None)."""
    for config in configs:
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return value, config
    return None, None


def _one_field(model: nn.Module, configs: list[Any], names: tuple[str, ...], neutral: Any,
               what: str) -> tuple[Optional[float], Optional[str], Any]:
    """(value, name, config) of the one field of ``names`` a config sets, or (None, None, None)."""
    found = []
    for name in names:
        value, config = _field(configs, name, neutral)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{type(model).__name__} sets {name}={value!r}: a {what} the fused head can "
                             "express is a finite number > 0")
        found.append((float(value), name, config))
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} sets {' and '.join(f'{n}={v}' for v, n, _ in found)}: no model is "
                         f"known to apply two of them, so which {what} its logits have is not known here")
    return found[0] if found else (None, None, None)


# what a forward may do to its trunk's output on the way into its head, and to the head's output
# on the way to its logits: cast, reshape, slice, scale by a field read above (dividing the hidden
# states by s divides the bias-free logits by s), and after the head, cap with a cap field read
_CASTS_AND_SHAPES = ("to", "contiguous", "float", "type_as", "view", "reshape")
# functions a cap is computed with (xLSTM's soft_cap(logits, cap) takes the cap field itself)
_CAP_CALLS = ("tanh", "soft_cap", "softcap")


@dataclass
class _ForwardReading:
    """What a model's forward does around its head ``self.<head_attr>``, read from its source:
    ``reads``, the subscripts and attributes it takes of a trunk's output (the result of a
    ``self...(...)`` call) for the head's input; ``before``, anything else it does on the way into
    the head; ``after``, anything it does to the head's output on the way to its ``logits=``
    other than what the fused head applies (all three as source text); ``fields``, the logit scale
    and cap fields it multiplies (``"mul"``) or divides (``"div"``) by on either way, or passes to
    a cap function (``"cap"``), as (field, how); ``cap_module``, whether the logits pass through a
    weightless child module (the cap ``logit_transform`` probes); ``tanh``, whether they pass
    through a cap function (``tanh``, ``soft_cap``); ``read``, whether it calls its head at all
    (False, and all empty, where the source is not readable)."""

    reads: list[str]
    before: list[str]
    after: list[str]
    fields: list[tuple[str, str]]
    cap_module: bool = False
    tanh: bool = False
    read: bool = False


def _resolve(expr: ast.expr, fn: Any) -> Any:
    """The object a dotted name (``soft_cap``, ``utils.soft_cap``) in ``fn``'s source refers to,
    through its module's globals; None when it is not such a name or not found."""
    if isinstance(expr, ast.Attribute):
        owner = _resolve(expr.value, fn)
        return None if owner is None else getattr(owner, expr.attr, None)
    return getattr(fn, "__globals__", {}).get(expr.id) if isinstance(expr, ast.Name) else None


def _caps_as_c_tanh_z_over_c(fn: Any) -> bool:
    """Whether the source of ``fn(z, c, ...)``, a cap function the forward hands its logits and a
    cap field (xLSTM's ``soft_cap``), returns ``c * tanh(z / c)`` (or ``z`` itself, for no cap)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    definition = tree.body[0]
    if not isinstance(definition, ast.FunctionDef) or len(definition.args.args) < 2:
        return False
    z, c = (arg.arg for arg in definition.args.args[:2])

    def name(expr: ast.expr, want: str) -> bool:
        return isinstance(expr, ast.Name) and expr.id == want

    def tanh_of_z_over_c(expr: ast.expr) -> bool:
        return (isinstance(expr, ast.Call) and ast.unparse(expr.func).rsplit(".", 1)[-1] == "tanh"
                and len(expr.args) == 1 and isinstance(expr.args[0], ast.BinOp)
                and isinstance(expr.args[0].op, ast.Div) and name(expr.args[0].left, z) and name(expr.args[0].right, c))

    def capped(value: Optional[ast.expr]) -> bool:
        return isinstance(value, ast.BinOp) and isinstance(value.op, ast.Mult) and (
            (name(value.left, c) and tanh_of_z_over_c(value.right))
            or (tanh_of_z_over_c(value.left) and name(value.right, c)))

    returns = [node.value for node in ast.walk(definition) if isinstance(node, ast.Return)]
    # z itself only beside a capped return: its no-cap path, not a function that never caps
    return any(capped(value) for value in returns) and all(
        capped(value) or (value is not None and name(value, z)) for value in returns)


def _read_forward(fn: Any, head_attr: str, stateless: tuple[str, ...]) -> _ForwardReading:
    """``fn``'s reading (see ``_ForwardReading``); ``stateless``: the model's children without
    weights that ``logit_transform`` probes as the cap, which the logits may pass through."""
    reading = _ForwardReading([], [], [], [])
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return reading
    bound: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AnnAssign, ast.NamedExpr)) else [])
        for target in targets:
            if isinstance(target, ast.Name) and node.value is not None:
                bound.setdefault(target.id, []).append(node.value)
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):  # logits *= s
            bound.setdefault(node.target.id, []).append(
                ast.BinOp(left=ast.Name(id=node.target.id, ctx=ast.Load()), op=node.op, right=node.value))

    def self_call(value: ast.expr) -> Optional[str]:
        """The first attribute of a ``self.<attr>...(...)`` call, else None."""
        if not isinstance(value, ast.Call):
            return None
        func = value.func
        while isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute):
            func = func.value
        return func.attr if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
            and func.value.id == "self" else None

    def read_field(expr: ast.expr, fields: tuple[str, ...]) -> Optional[str]:
        """The one of ``fields`` that ``expr`` holds, as an attribute or through a local bound to one, else None."""
        for node in ast.walk(expr):
            if isinstance(node, ast.Attribute) and node.attr in fields:
                return node.attr
            if isinstance(node, ast.Name):
                for n in (n for v in bound.get(node.id, ()) for n in ast.walk(v)):
                    if isinstance(n, ast.Attribute) and n.attr in fields:
                        return n.attr
        return None

    outputs = {name for name, values in bound.items() if any(self_call(v) for v in values)}

    def passes(expr: ast.expr, fields: tuple[str, ...], follow) -> bool:  # noqa: ANN001
        """Follow what the fused head also does (a slice, a cast or reshape, a field's scale); False otherwise."""
        if isinstance(expr, ast.Subscript):
            follow(expr.value)
        elif isinstance(expr, ast.IfExp):
            follow(expr.body)
            follow(expr.orelse)
        elif isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr in _CASTS_AND_SHAPES:
            follow(expr.func.value)
        elif isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Div, ast.Mult)) and read_field(expr.right, fields):
            reading.fields.append((read_field(expr.right, fields), "div" if isinstance(expr.op, ast.Div) else "mul"))
            follow(expr.left)
        elif isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Mult) and read_field(expr.left, fields):
            reading.fields.append((read_field(expr.left, fields), "mul"))
            follow(expr.right)
        else:
            return False
        return True

    seen: set[str] = set()

    def into_head(expr: ast.expr) -> None:
        if isinstance(expr, ast.Name):
            # a trunk's output is where the trail ends: what went into the trunk is not read
            if expr.id in bound and expr.id not in outputs and expr.id not in seen:
                seen.add(expr.id)
                for value in bound[expr.id]:
                    into_head(value)
        elif isinstance(expr, (ast.Subscript, ast.Attribute)) and (
                (isinstance(expr.value, ast.Name) and expr.value.id in outputs) or self_call(expr.value)):
            reading.reads.append(ast.unparse(expr))
        elif isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "slice_logits_to_keep":
            into_head(expr.args[0])
        elif not passes(expr, SCALE_FIELDS, into_head):
            reading.before.append(ast.unparse(expr))

    def from_head(expr: ast.expr) -> None:
        if isinstance(expr, ast.Constant):  # logits=None
            return
        if isinstance(expr, ast.Name):
            if expr.id in bound and expr.id not in seen:
                seen.add(expr.id)
                for value in bound[expr.id]:
                    from_head(value)
            return
        called = self_call(expr)
        if called == head_attr:
            return
        name = ast.unparse(expr.func).rsplit(".", 1)[-1] if isinstance(expr, ast.Call) else ""
        if called in stateless or (called is None and name in _CAP_CALLS):
            # a cap: a module logit_transform probes, or a tanh whose scaling passes() reads
            reading.cap_module |= called in stateless
            reading.tanh |= called not in stateless
            for arg in [*expr.args[1:], *(k.value for k in expr.keywords)]:  # xLSTM's soft_cap(logits, cap)
                if read_field(arg, CAP_FIELDS):
                    reading.fields.append((read_field(arg, CAP_FIELDS), "cap"))
                    if not _caps_as_c_tanh_z_over_c(_resolve(expr.func, inspect.unwrap(fn))):
                        reading.after.append(f"{ast.unparse(expr)} (whose source does not read as "
                                             "c * tanh(z / c))")
            from_head(expr.args[0] if expr.args else expr.func.value)
        elif not passes(expr, SCALE_FIELDS + CAP_FIELDS, from_head):
            reading.after.append(ast.unparse(expr))

    for node in ast.walk(tree):
        if self_call(node) == head_attr and node.args and isinstance(node.func, ast.Attribute) \
                and node.func.attr == head_attr:
            reading.read = True
            into_head(node.args[0])
    seen.clear()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "logits":
                    from_head(keyword.value)
    return reading


def _check_forward(model: nn.Module, head_attr: str, stateless: tuple[str, ...]) -> _ForwardReading:
    """The forward's reading (``_read_forward``). Refuse a forward that applies its head to another
    output of its trunk than the last hidden state (its first), transforms that state first
    otherwise than by a logit scale field, or transforms the head's output otherwise than by the
    scale and cap fields read above: the fused head reads the last hidden state as it is and
    applies only those."""
    name = type(model).__name__
    reading = _read_forward(type(model).forward, head_attr, stateless)
    other = [read for read in reading.reads if not (read.endswith(".last_hidden_state") or read.endswith("[0]"))]
    if other:
        raise ValueError(f"{name}.forward applies its output embedding ({head_attr}) to "
                         f"{', '.join(sorted(set(other)))} of its trunk's output, not to its last hidden state, "
                         "which the fused head reads")
    if reading.before:
        raise ValueError(f"{name}.forward computes its output embedding's ({head_attr}) input as "
                         f"{'; '.join(sorted(set(reading.before)))}: the fused head reads the trunk's last hidden "
                         f"state as it is, scaled only by a logit scale field of the config ({', '.join(SCALE_FIELDS)})")
    if reading.after:
        raise ValueError(f"{name}.forward computes its logits from its output embedding's ({head_attr}) output as "
                         f"{'; '.join(sorted(set(reading.after)))}: the fused head applies only a logit scale "
                         f"({', '.join(SCALE_FIELDS)}) and a tanh soft cap ({', '.join(CAP_FIELDS)}) of the config")
    return reading


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(module)`` returned ``model`` for, else ``model``. The compiled
    wrapper's attributes and forward reach the module's own (looked up when called)."""
    # torch.compile's wrapper class, from the torch._dynamo that compiling it imported
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    while dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        model = model._orig_mod
    return model


def _head_and_trunk(model: nn.Module) -> tuple[nn.Linear, str, list[tuple[str, nn.Module]], _ForwardReading]:
    """(output embedding, name of the trunk's attribute, the other children holding no tensors, the
    forward's reading)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None)")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(
            f"{type(model).__name__}'s output embedding is a {type(head).__module__}.{type(head).__qualname__}, "
            "not a plain torch.nn.Linear: "
            "the fused head computes hidden @ weight.T + bias and would skip what its forward adds"
        )
    children = list(model.named_children())
    if not any(child is head for _, child in children):
        where = next(name for name, module in model.named_modules() if module is head)
        raise ValueError(f"{type(model).__name__}'s output embedding is {where}, inside {where.split('.')[0]!r}, "
                         "whose forward runs between the trunk and it (a prediction head's transform, in BERT-style "
                         "models): the fused head reads the trunk's last hidden state and would skip it")
    others = [(name, child) for name, child in children if child is not head]
    stateful = [name for name, child in others
                if next(child.parameters(), None) is not None or next(child.buffers(), None) is not None]
    if len(stateful) != 1:
        raise ValueError(f"{type(model).__name__} has {len(stateful)} children with weights beside its output "
                         f"embedding ({', '.join(stateful) or 'none'}), not one trunk: the fused head reads one "
                         "trunk's last hidden state and would skip what another adds")
    stateless = [(name, child) for name, child in others if name != stateful[0]]
    reading = _check_forward(model, next(name for name, child in children if child is head),
                             tuple(n for n, _ in stateless))
    return head, stateful[0], stateless, reading


def trunk_name(model: nn.Module) -> str:
    """The attribute of ``model`` holding its trunk (``"model"``, ``"transformer"``, ...): the module
    whose last hidden state ``[B, T, H]`` the output embedding reads (of the module ``torch.compile``
    wrapped, for a compiled model). Raises like ``logit_transform``."""
    return _head_and_trunk(uncompiled(model))[1]


def logit_transform(model: nn.Module) -> LogitTransform:
    """The transform ``model`` (or the module ``torch.compile`` wrapped) applies after its output
    embedding (see the module docstring).

    Raises:
        ValueError: the output embedding is missing, not a plain ``nn.Linear``, or not the child
            of ``model`` beside one trunk; two scale or two cap fields are set that the forward
            applies (all that are set, where its source cannot be read); a scale or cap is not a
            finite number > 0; ``unpadded_vocab_size`` is not an int in [1, the head's rows]; the
            forward (read from its source) applies a tanh under no cap field, reads a cap field
            without a tanh, caps otherwise than as ``c * tanh(z / c)``, or both multiplies and
            divides by the scale field.
    """
    model = uncompiled(model)
    head, _, stateless, reading = _head_and_trunk(model)
    configs = _configs(model)
    # where the source is read, a field its forward never applies on the way to its logits is not
    # theirs (MPT sets logit_scale and ignores it), so only the fields it applies are looked up
    applies = {field for field, _ in reading.fields}
    scale, name, config = _one_field(
        model, configs, tuple(f for f in SCALE_FIELDS if f in applies) if reading.read else SCALE_FIELDS,
        1.0, "logit scale")
    if scale is not None and reading.read:
        # the forward's source says how it applies the field (remote code may use a known name
        # either way round)
        applied = {how for field, how in reading.fields if field == name}
        if len(applied) > 1:
            raise ValueError(f"{type(model).__name__}.forward both multiplies and divides by {name}: which scale "
                             "its logits have is not known here")
        scale = scale if applied == {"mul"} else 1.0 / scale
    elif scale is not None and (name == "logits_mup_width_multiplier" or (
            name == "logits_scaling" and getattr(config, "model_type", None) not in _MULTIPLYING_LOGITS_SCALING)):
        # an unreadable forward: how the known families apply the field
        scale = 1.0 / scale
    # a cap module (Inkling 2's) takes its field when it is built, not in the forward: it is probed below
    read_caps = reading.read and not reading.cap_module
    softcap, cap_name, _ = _one_field(
        model, configs, tuple(f for f in CAP_FIELDS if f in applies) if read_caps else CAP_FIELDS,
        None, "logit soft cap")
    if read_caps:
        caps_read = {field for field, _ in reading.fields if field in CAP_FIELDS}
        # a tanh is the cap only with a cap field around it, a cap field caps only through one, and
        # only as c * tanh(logits / c): divided into the tanh and multiplied out of it, or handed
        # to a cap function (xLSTM's soft_cap(logits, c))
        hows = {how for field, how in reading.fields if field == cap_name}
        if reading.tanh != bool(caps_read) or (softcap is not None and "cap" not in hows and hows != {"div", "mul"}):
            raise ValueError(f"{type(model).__name__}.forward " + (
                f"reads {', '.join(sorted(caps_read))} on the way to its logits without a tanh" if not reading.tanh
                else f"applies a tanh to its logits under no logit soft cap field ({', '.join(CAP_FIELDS)})"
                if not caps_read else f"caps its logits with {cap_name} otherwise than as c * tanh(logits / c)")
                + ": the fused head caps the logits as c * tanh(logits / c), c a cap field of the config, "
                "or not at all")
    unpadded, _ = _field(configs, "unpadded_vocab_size")
    if unpadded is not None and (isinstance(unpadded, bool) or not isinstance(unpadded, int)
                                 or not 1 <= unpadded <= head.out_features):
        # Inkling cuts its logits only when the field is below the head's rows; Inkling 2 sizes
        # its head by it: a larger value cannot be a cut of this head
        raise ValueError(f"{type(model).__name__} sets unpadded_vocab_size={unpadded!r}: the fused head keeps that "
                         f"many of its head's {head.out_features} rows, so it must be an int in "
                         f"[1, {head.out_features}]")
    for name, child in stateless:
        # a module between the head and the logits that holds no weights, e.g. Inkling 2's soft cap:
        # served only if it computes the cap read from the config (or nothing) on a probe
        probe = torch.linspace(-4.0, 4.0, 9) * (softcap or 1.0)
        expected = probe if softcap is None else softcap * torch.tanh(probe / softcap)
        try:
            agrees = torch.allclose(child(probe), expected, rtol=1e-5, atol=1e-6)
        except Exception:  # noqa: BLE001 - any failure means the module is not that function
            agrees = False
        if not agrees:
            raise ValueError(f"{type(model).__name__}.{name} ({type(child).__qualname__}) is a module beside the trunk "
                             "and the output embedding that computes neither the logits' soft cap read from the "
                             "config nor nothing: the fused head would skip it")
    return LogitTransform(scale=1.0 if scale is None else scale, softcap=softcap,
                          vocab=unpadded if unpadded is not None and unpadded < head.out_features else None)
