"""Random small CNNs from a grammar, for the capture property test (issue 20).

:func:`generate` turns a seed into a :class:`GenModel`: a real ``nn.Module`` whose
``forward`` interprets a program (a list of :class:`Op` records stored on the module) over
numbered values ("slots"), with every submodule registered under a readable name
(``conv3``, ``act5``, ``wrap7.bn``). The grammar draws from:

* convolutions (kernel 1/3/5, stride 1/2, padding, groups, bias; as modules and ``F.conv2d``),
  max / average pools (modules, functions, adaptive), batch norm, dropout;
* the rectifiers ReLU, ReLU6, LeakyReLU, ELU, SiLU, GELU, Hardswish, as modules and as
  ``F.*`` / ``torch.*`` / method calls, and their in-place forms (``relu_``,
  ``nn.ReLU(inplace=True)``, ``F.silu(x, inplace=True)``, ...);
* add / sub / mul / cat / split / chunk, broadcast gates (squeeze-excitation, spatial),
  ``x += y``, ``x *= y``, ``x.add_(y)``, ``a += b + c`` (then ``b`` read again), an alias
  (``keep = t``) later written through, ``t[:, :k] = v``;
* the signal written in place into a tensor made from a shape alone (``new_zeros`` then
  ``index_add_``, ``zeros_like`` then ``add_``, ``new_empty`` then ``copy_``);
* views: flatten / reshape round trips, permute (a channel-last ``Linear``), transpose,
  channel shuffle, ``t[..., 1:]``, channel slices, flip;
* constants broadcast against maps (``torch.clamp(t, min=buf)``, buf (1, 1, H, W)),
  ``torch.where``, ``masked_fill``, ``x * (x > 0).float()``;
* forward hooks that change a module's output (``o * 3``, ``o.flip(-1)``) or not, and
  forward pre-hooks; untraceable wrappers (``if x.sum() > -1e9:`` or ``if x.shape[-1] > 0:``
  in ``forward``, which torch.fx cannot trace) holding conv / batch norm / dropout, or
  writing into their input (``x[:, :k] = relu(conv(x))[:, :k]``) with a result nobody reads;
* the model in ``eval()`` or in ``train()`` (batch norm and dropout then act in training
  mode when the model itself runs).

Every model ends with global average pooling and a ``Linear`` module ``head`` (N, classes).
:meth:`GenModel.out_of_place_twin` is the same function written without any in-place
write (same weights, same hooks), for the oracle: an in-place write rebinds every exact alias
of the tensor it wrote, and the generator never reads a *view* of a written tensor (or the
tensor a written view was cut from) after the write, so the twin computes the same values.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re

import torch
import torch.nn.functional as F
from torch import nn

IMAGE = (3, 16, 16)
MAX_C = 8
CLASSES = 5


# --------------------------------------------------------------------------- hooks


class ScaleHook:
    """Forward hook: the module's output times 3."""

    def __call__(self, _m: nn.Module, _i: tuple, o: torch.Tensor) -> torch.Tensor:
        return o * 3

    def __repr__(self) -> str:
        return "forward hook: return o * 3"


class FlipHook:
    """Forward hook: the module's output mirrored left-right."""

    def __call__(self, _m: nn.Module, _i: tuple, o: torch.Tensor) -> torch.Tensor:
        return o.flip(-1)

    def __repr__(self) -> str:
        return "forward hook: return o.flip(-1)"


class ObserveHook:
    """Forward hook that changes nothing (returns ``None``)."""

    def __call__(self, _m: nn.Module, _i: tuple, o: torch.Tensor) -> None:
        _ = o.shape
        return None

    def __repr__(self) -> str:
        return "forward hook: observes, returns None"


class PreScaleHook:
    """Forward pre-hook: the module's input times 0.5."""

    def __call__(self, _m: nn.Module, args: tuple) -> tuple:
        return (args[0] * 0.5,)

    def __repr__(self) -> str:
        return "forward pre-hook: return (args[0] * 0.5,)"


class PreObserveHook:
    """Forward pre-hook that changes nothing."""

    def __call__(self, _m: nn.Module, args: tuple) -> None:
        return None

    def __repr__(self) -> str:
        return "forward pre-hook: observes, returns None"


# --------------------------------------------------------------------------- untraceable wrapper


class Opaque(nn.Module):
    """A submodule torch.fx cannot trace: its ``forward`` branches on the data (``x.sum()``) or
    on a shape. ``body`` says what it runs:

    * ``"block"``: conv -> batch norm -> ReLU -> dropout;
    * ``"bn_drop"``: batch norm -> dropout;
    * ``"write_input"``: ``x[:, :k] = F.relu(self.conv(x))[:, :k]``, returns ``self.conv(x)``'s
      value from before the write (the caller may ignore it);
    * ``"relu_input"``: ``F.relu(x, inplace=True)``, returns ``x``.

    In the out-of-place twin (``twin=True``) a body that writes its input computes the new
    input out of place and leaves it in ``_stash`` (a list, so that it is no tensor attribute)
    for the interpreter, and returns what the module returns, so that its hooks and the
    oracle's capture see the module's own output.
    """

    def __init__(self, body: str, c: int, cout: int, k: int, cond: str) -> None:
        super().__init__()
        self.body, self.k, self.cond, self.twin = body, k, cond, False
        if body in ("block", "write_input"):
            self.conv = nn.Conv2d(c, cout, 3, padding=1)
        if body in ("block", "bn_drop"):
            self.bn = nn.BatchNorm2d(cout)
            self.drop = nn.Dropout(0.5)
        if body == "block":
            self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cond == "data":
            go = x.sum() > -1e9
        else:
            go = x.shape[-1] > 0
        if go:  # torch.fx: "symbolically traced variables cannot be used as inputs to control flow"
            return self._run(x)
        return x

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.body == "block":
            return self.drop(self.act(self.bn(self.conv(x))))
        if self.body == "bn_drop":
            return self.drop(self.bn(x))
        if self.body == "write_input":
            y = self.conv(x)
            if self.twin:
                self._stash = [torch.cat([F.relu(y[:, : self.k]), x[:, self.k :]], dim=1)]
                return y
            x[:, : self.k] = F.relu(y)[:, : self.k]
            return y
        if self.twin:  # relu_input
            r = F.relu(x)
            self._stash = [r]
            return r
        return F.relu(x, inplace=True)

    def extra_repr(self) -> str:
        return f"body={self.body!r}, cond={self.cond!r}"


# --------------------------------------------------------------------------- program


@dataclasses.dataclass
class Op:
    """One step of a program: ``outs = kind(ins)``; ``write``: the slot it writes in place."""

    kind: str
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    args: dict = dataclasses.field(default_factory=dict)
    module: str | None = None
    write: int | None = None
    text: str = ""


_FACT = {
    "F.relu(a)": lambda a: F.relu(a), "torch.relu(a)": lambda a: torch.relu(a), "a.relu()": lambda a: a.relu(),
    "F.relu6(a)": lambda a: F.relu6(a), "F.leaky_relu(a, 0.2)": lambda a: F.leaky_relu(a, 0.2),
    "F.elu(a)": lambda a: F.elu(a), "F.silu(a)": lambda a: F.silu(a), "F.gelu(a)": lambda a: F.gelu(a),
    "F.gelu(a, approximate='tanh')": lambda a: F.gelu(a, approximate="tanh"),
    "F.hardswish(a)": lambda a: F.hardswish(a),
}  # fmt: skip
#: In-place rectifier calls: (in place, out of place).
_FACT_INPLACE = {
    "F.relu(a, inplace=True)": (lambda a: F.relu(a, inplace=True), F.relu),
    "torch.relu_(a)": (lambda a: torch.relu_(a), F.relu),
    "a.relu_()": (lambda a: a.relu_(), F.relu),
    "F.relu6(a, inplace=True)": (lambda a: F.relu6(a, inplace=True), F.relu6),
    "F.leaky_relu(a, 0.2, inplace=True)": (
        lambda a: F.leaky_relu(a, 0.2, inplace=True), lambda a: F.leaky_relu(a, 0.2)),
    "F.elu(a, inplace=True)": (lambda a: F.elu(a, inplace=True), F.elu),
    "F.silu(a, inplace=True)": (lambda a: F.silu(a, inplace=True), F.silu),
    "F.hardswish(a, inplace=True)": (lambda a: F.hardswish(a, inplace=True), F.hardswish),
}
_MASK = {
    "torch.where(a > 0, a, 0.1 * a)": lambda a: torch.where(a > 0, a, 0.1 * a),
    "a.masked_fill(a < 0, 0.0)": lambda a: a.masked_fill(a < 0, 0.0),
    "a * (a > 0).float()": lambda a: a * (a > 0).float(),
}


class GenModel(nn.Module):
    """A generated model: ``forward`` runs ``self.program`` over slots (slot 0: the input)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.program: list[Op] = []
        self.n_slots = 1
        self.result = 0
        self.twin = False
        self.layers: list[str] = []

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: list = [None] * self.n_slots
        env[0] = x
        for op in self.program:
            self._step(op, env)
        return env[self.result]

    def _step(self, op: Op, env: list) -> None:
        ins = [env[i] for i in op.ins]
        if self.twin and op.write is not None:
            old = env[op.write]
            new_written, outs = self._twin_op(op, ins)
            for j, v in enumerate(env):
                if v is old:
                    env[j] = new_written
        else:
            outs = self._op(op, ins)
        for slot, value in zip(op.outs, outs):
            env[slot] = value

    def _op(self, op: Op, ins: list) -> tuple:  # noqa: C901 - one branch per kind, as written by hand
        k, a = op.kind, op.args
        m = self.get_submodule(op.module) if op.module else None
        x = ins[0] if ins else None
        if k == "module":
            return (m(x),)
        if k == "opaque":
            return (m(x),)
        if k == "fconv":
            return (F.conv2d(x, getattr(self, a["w"]), getattr(self, a["b"]) if a["b"] else None, a["stride"],
                             a["padding"], 1, a["groups"]),)
        if k == "fpool":
            if a["max"]:
                return (F.max_pool2d(x, a["k"], a["s"], a["p"]),)
            return (F.avg_pool2d(x, a["k"], a["s"], a["p"]),)
        if k == "fact":
            return (_FACT[a["f"]](x),)
        if k == "fact_":
            return (_FACT_INPLACE[a["f"]][0](x),)
        if k == "mask":
            return (_MASK[a["f"]](x),)
        if k == "add":
            return (x + ins[1],)
        if k == "sub":
            return (x - ins[1],)
        if k == "mul":
            return (x * ins[1],)
        if k == "add_alpha":
            return (torch.add(x, ins[1], alpha=a["alpha"]),)
        if k == "iadd":
            x += ins[1]
            return (x,)
        if k == "imul":
            x *= ins[1]
            return (x,)
        if k == "add_":
            return (x.add_(ins[1]),)
        if k == "iadd3":
            x += ins[1] + ins[2]
            return (x,)
        if k == "iadd_const":
            x += 0.5
            return (x,)
        if k == "setitem":
            x[:, : a["k"]] = ins[1][:, : a["k"]]
            return (x,)
        if k == "alias":
            return (x,)
        if k == "shape_write":  # the signal written into a tensor made from a shape alone
            if a["how"] == "index_add_":
                z = x.new_zeros(x.shape)
                return (z.index_add_(1, torch.arange(a["k"] - 1, -1, -1), x[:, : a["k"]]),)
            if a["how"] == "add_":
                z = torch.zeros_like(x)
                z.add_(x * 0.5)
                return (z,)
            z = x.new_empty(x.shape)
            z.copy_(x.flip(1))
            return (z,)
        if k == "cat":
            return (torch.cat([x, ins[1]], dim=1),)
        if k == "split":
            first, second = x.split([a["k"], a["c"] - a["k"]], dim=1)
            return first, second
        if k == "chunk":
            first, second = x.chunk(2, dim=1)
            return first, second
        if k == "se":
            return (x * torch.sigmoid(m(F.adaptive_avg_pool2d(x, 1))),)
        if k == "spatial_gate":
            return (x * torch.sigmoid(x.mean(1, keepdim=True)),)
        if k == "const":
            buf = getattr(self, a["buf"])
            return ({"clamp": lambda: torch.clamp(x, min=buf), "add": lambda: x + buf, "mul": lambda: x * buf,
                     "maximum": lambda: torch.maximum(x, buf)}[a["how"]](),)
        return self._view(op, x, m)

    def _view(self, op: Op, x: torch.Tensor, m: nn.Module | None) -> tuple:
        k, a = op.kind, op.args
        c, h, w = a.get("chw", (0, 0, 0))
        if k == "flatten_round":
            return (x.flatten(1).view(x.shape[0], c, h, w),)
        if k == "reshape_round":
            return (x.reshape(x.shape[0], c * h, w).reshape(x.shape[0], c, h, w),)
        if k == "transpose":
            return (x.transpose(2, 3),)
        if k == "permute_linear":
            return (m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),)
        if k == "shuffle":
            return (x.reshape(x.shape[0], 2, c // 2, h, w).transpose(1, 2).reshape(x.shape[0], c, h, w),)
        if k == "slice_w":
            return (x[..., 1:],)
        if k == "slice_c":
            return (x[:, a["lo"] : a["hi"]],)
        if k == "flip":
            return (x.flip(-1),)
        if k == "dropout_f":
            return (F.dropout(x, 0.3, self.training),)
        if k == "head":
            return (m(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)),)
        raise AssertionError(f"unknown op {k}")

    def _twin_op(self, op: Op, ins: list) -> tuple[torch.Tensor, tuple]:
        """The out-of-place form of an op that writes in place: (the written slot's new
        value, the op's outputs)."""
        k, a, x = op.kind, op.args, ins[0]
        if k == "opaque":
            mod = self.get_submodule(op.module)  # type: ignore[arg-type]
            out = mod(x)
            return mod._stash.pop(), (out,)
        if k == "module":  # nn.ReLU(inplace=True) and the like; the twin's copy has inplace=False
            y = self.get_submodule(op.module)(x)  # type: ignore[arg-type]
            return y, (y,)
        new = {
            "fact_": lambda: _FACT_INPLACE[a["f"]][1](x),
            "iadd": lambda: x + ins[1],
            "imul": lambda: x * ins[1],
            "add_": lambda: x + ins[1],
            "iadd3": lambda: x + (ins[1] + ins[2]),
            "iadd_const": lambda: x + 0.5,
            "setitem": lambda: torch.cat([ins[1][:, : a["k"]], x[:, a["k"] :]], dim=1),
        }[k]()
        return new, (new,)

    # ----------------------------------------------------------------- helpers
    def out_of_place_twin(self) -> GenModel:
        """The same function with no in-place write (same weights and hooks)."""
        twin = copy.deepcopy(self)
        twin.twin = True
        for mod in twin.modules():
            if isinstance(mod, Opaque):
                mod.twin = True
            if getattr(mod, "inplace", None) is True:
                mod.inplace = False
        return twin

    def writes_in_place(self) -> bool:
        return any(op.write is not None for op in self.program)

    def describe(self) -> str:
        """The program as Python-like lines, with the mode, the hooks and the layers."""
        lines = [f"GenModel(seed={self.seed}) in {'train' if self.training else 'eval'}() mode; input {IMAGE}"]
        lines += ["  " + op.text for op in self.program]
        lines.append(f"  return s{self.result}")
        for name, mod in self.named_modules():
            for h in list(mod._forward_pre_hooks.values()) + list(mod._forward_hooks.values()):
                lines.append(f"  hook on {name}: {h!r}")
        lines.append(f"  layers: {self.layers}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- generator


@dataclasses.dataclass
class _Slot:
    shape: tuple[int, int, int]
    group: int  # storage: views share their base's
    obj: int  # object identity: aliases share it
    multi_view: bool = False  # an output of split / chunk (not writable in place)
    dead: bool = False  # a view of a written tensor (or the base of a written view)


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.model = GenModel(seed)
        self.slots: list[_Slot] = [_Slot(IMAGE, 0, 0)]
        self.counter = 0
        self.hookable: list[str] = []

    # slots
    def new_id(self) -> int:
        self.counter += 1
        return self.counter

    def live(self, pred=lambda s: True) -> list[int]:  # noqa: ANN001
        return [i for i, s in enumerate(self.slots) if not s.dead and len(s.shape) == 3 and pred(s)]

    def add_slot(self, shape: tuple[int, int, int], *, like: int | None = None, view: bool = False,
                 alias: bool = False, multi: bool = False) -> int:
        if like is not None and (view or alias):
            base = self.slots[like]
            slot = _Slot(shape, base.group, base.obj if alias else self.new_id(), multi or (alias and base.multi_view))
        else:
            slot = _Slot(shape, self.new_id(), self.counter, multi)
        self.slots.append(slot)
        return len(self.slots) - 1

    def name(self, prefix: str) -> str:
        return f"{prefix}{len(self.model.program)}"

    def emit(self, op: Op) -> None:
        self.model.program.append(op)

    def writable(self, i: int) -> bool:
        s = self.slots[i]
        return s.group != 0 and not s.multi_view and not s.dead

    def wrote(self, i: int) -> None:
        """Slot ``i`` was written in place: views of it, and what it is a view of, die."""
        s = self.slots[i]
        for t in self.slots:
            if t.group == s.group and t.obj != s.obj:
                t.dead = True

    def pick(self, pool: list[int]) -> int:
        # prefer recent values, so that the program is mostly deep, with side branches
        weights = [1.0 + 3.0 * (j == len(pool) - 1) + j * 0.3 for j in range(len(pool))]
        return self.rng.choices(pool, weights)[0]


def _show(f: str, i: int) -> str:
    """A call's text with its operand named: ``F.relu(a)`` -> ``F.relu(s3)``."""
    return re.sub(r"\ba\b", f"s{i}", f)


def _out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _g_conv(g: _Gen) -> None:
    r = g.rng
    i = g.pick(g.live())
    c, h, w = g.slots[i].shape
    k = r.choice([1, 3, 3, 5]) if min(h, w) >= 5 else r.choice([1, 3])
    s = r.choice([1, 1, 1, 2]) if min(h, w) >= 6 else 1
    p = r.choice([k // 2, k // 2, 0]) if _out(min(h, w), k, s, 0) >= 2 else k // 2
    cout = r.choice([c, c, r.randint(2, MAX_C)])
    groups = r.choice([gg for gg in (1, 2, c) if c % gg == 0 and cout % gg == 0] or [1]) if r.random() < 0.3 else 1
    bias = r.random() < 0.7
    shape = (cout, _out(h, k, s, p), _out(w, k, s, p))
    if r.random() < 0.75:
        name = g.name("conv")
        g.model.add_module(name, nn.Conv2d(c, cout, k, s, p, groups=groups, bias=bias))
        o = g.add_slot(shape)
        g.hookable.append(name)
        g.emit(Op("module", (i,), (o,), module=name,
                  text=f"s{o} = self.{name}(s{i})  # Conv2d({c}, {cout}, k={k}, s={s}, p={p}, groups={groups}, "
                       f"bias={bias}) -> {shape}"))
    else:
        wn, bn = g.name("w"), g.name("b")
        g.model.register_parameter(wn, nn.Parameter(torch.randn(cout, c // groups, k, k) / (k * (c // groups) ** 0.5)))
        g.model.register_parameter(bn, nn.Parameter(torch.randn(cout) * 0.1) if bias else None)
        o = g.add_slot(shape)
        args = {"w": wn, "b": bn if bias else None, "stride": s, "padding": p, "groups": groups}
        b_text = "self." + bn if bias else None
        g.emit(Op("fconv", (i,), (o,), args=args,
                  text=f"s{o} = F.conv2d(s{i}, self.{wn}, {b_text}, {s}, {p}, 1, {groups}) -> {shape}"))


def _g_pool(g: _Gen) -> None:
    r = g.rng
    pool = g.live(lambda s: min(s.shape[1:]) >= 4)
    if not pool:
        return
    i = g.pick(pool)
    c, h, w = g.slots[i].shape
    k = r.choice([2, 3])
    s = r.choice([1, 2, 2])
    p = r.choice([0, 0, 1]) if k == 3 else 0
    shape = (c, _out(h, k, s, p), _out(w, k, s, p))
    kind = r.choice(["max", "avg", "fmax", "favg", "adaptive"])
    if kind == "adaptive":
        shape = (c, max(2, h // 2), max(2, w // 2))
        mod: nn.Module = nn.AdaptiveAvgPool2d(shape[1:])
    elif kind == "max":
        mod = nn.MaxPool2d(k, s, p)
    elif kind == "avg":
        mod = nn.AvgPool2d(k, s, p, count_include_pad=r.random() < 0.5)
    else:
        o = g.add_slot(shape)
        fn = "max_pool2d" if kind == "fmax" else "avg_pool2d"
        g.emit(Op("fpool", (i,), (o,), args={"max": kind == "fmax", "k": k, "s": s, "p": p},
                  text=f"s{o} = F.{fn}(s{i}, {k}, {s}, {p}) -> {shape}"))
        return
    name = g.name("pool")
    g.model.add_module(name, mod)
    g.hookable.append(name)
    o = g.add_slot(shape)
    g.emit(Op("module", (i,), (o,), module=name, text=f"s{o} = self.{name}(s{i})  # {mod} -> {shape}"))


_ACT_MODULES = {
    "ReLU": lambda ip: nn.ReLU(inplace=ip), "ReLU6": lambda ip: nn.ReLU6(inplace=ip),
    "LeakyReLU": lambda ip: nn.LeakyReLU(0.1, inplace=ip), "ELU": lambda ip: nn.ELU(inplace=ip),
    "SiLU": lambda ip: nn.SiLU(inplace=ip), "GELU": lambda ip: nn.GELU(), "GELU-tanh": lambda ip: nn.GELU("tanh"),
    "Hardswish": lambda ip: nn.Hardswish(inplace=ip),
}  # fmt: skip


def _g_act(g: _Gen) -> None:
    r = g.rng
    i = g.pick(g.live())
    shape = g.slots[i].shape
    form = r.choice(["module", "module", "functional", "inplace"])
    if form == "module":
        kind = r.choice(list(_ACT_MODULES))
        inplace = g.writable(i) and "GELU" not in kind and r.random() < 0.4
        name = g.name("act")
        mod = _ACT_MODULES[kind](inplace)
        g.model.add_module(name, mod)
        if inplace:
            o = g.add_slot(shape, like=i, alias=True)
            g.wrote(i)
            g.emit(Op("module", (i,), (o,), module=name, write=i,
                      text=f"s{o} = self.{name}(s{i})  # {mod}, writes s{i}"))
        else:
            g.hookable.append(name)
            o = g.add_slot(shape)
            g.emit(Op("module", (i,), (o,), module=name, text=f"s{o} = self.{name}(s{i})  # {mod}"))
    elif form == "inplace" and g.writable(i):
        f = r.choice(list(_FACT_INPLACE))
        o = g.add_slot(shape, like=i, alias=True)
        g.wrote(i)
        g.emit(Op("fact_", (i,), (o,), args={"f": f}, write=i, text=f"s{o} = {_show(f, i)}  # writes s{i}"))
    else:
        f = r.choice(list(_FACT))
        o = g.add_slot(shape)
        g.emit(Op("fact", (i,), (o,), args={"f": f}, text=f"s{o} = {_show(f, i)}"))


def _g_norm(g: _Gen) -> None:
    r = g.rng
    i = g.pick(g.live())
    c = g.slots[i].shape[0]
    if r.random() < 0.7:
        name = g.name("bn")
        mod: nn.Module = nn.BatchNorm2d(c)
        with torch.no_grad():
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.uniform_(-0.2, 0.2)
            mod.num_batches_tracked.fill_(r.randint(0, 9))
    elif r.random() < 0.5:
        name = g.name("drop")
        mod = nn.Dropout(r.choice([0.2, 0.5]))
    else:  # in eval mode, dropout returns its input itself: an alias
        o = g.add_slot(g.slots[i].shape, like=i, alias=True)
        g.emit(Op("dropout_f", (i,), (o,), text=f"s{o} = F.dropout(s{i}, 0.3, self.training)"))
        return
    g.model.add_module(name, mod)
    g.hookable.append(name)
    o = g.add_slot(g.slots[i].shape, like=i, alias=isinstance(mod, nn.Dropout))
    g.emit(Op("module", (i,), (o,), module=name, text=f"s{o} = self.{name}(s{i})  # {mod}"))


def _pair(g: _Gen) -> tuple[int, int] | None:
    live = g.live()
    pairs = [(a, b) for a in live for b in live if a != b and g.slots[a].shape == g.slots[b].shape]
    if not pairs:
        return None
    a = g.pick(sorted({p[0] for p in pairs}))
    return a, g.rng.choice([p[1] for p in pairs if p[0] == a])


def _g_branch(g: _Gen) -> None:
    """A side branch that keeps the shape (conv 3x3 pad 1, C -> C), so binary ops find pairs."""
    i = g.pick(g.live())
    c, h, w = g.slots[i].shape
    name = g.name("conv")
    g.model.add_module(name, nn.Conv2d(c, c, 3, padding=1, bias=g.rng.random() < 0.5))
    g.hookable.append(name)
    o = g.add_slot((c, h, w))
    g.emit(Op("module", (i,), (o,), module=name, text=f"s{o} = self.{name}(s{i})  # Conv2d({c}, {c}, 3, padding=1)"))


def _g_binary(g: _Gen) -> None:
    r = g.rng
    pair = _pair(g)
    if pair is None:
        _g_branch(g)
        pair = _pair(g)
        if pair is None:
            return
    a, b = pair
    shape = g.slots[a].shape
    kind = r.choice(["add", "add", "sub", "mul", "add_alpha", "cat", "iadd", "imul", "add_", "iadd3"])
    if kind in ("iadd", "imul", "add_", "iadd3") and (not g.writable(a) or g.slots[b].group == g.slots[a].group):
        kind = "add"  # (never into the input, a split's part, or from memory it shares)
    if kind == "cat":
        if 2 * shape[0] > MAX_C + 4:
            kind = "add"
        else:
            o = g.add_slot((2 * shape[0], *shape[1:]))
            g.emit(Op("cat", (a, b), (o,), text=f"s{o} = torch.cat([s{a}, s{b}], dim=1)"))
            return
    if kind == "iadd3":
        third = [t for t in g.live(lambda s: s.shape == shape and s.group != g.slots[a].group)]
        c3 = r.choice(third) if third else b
        o = g.add_slot(shape, like=a, alias=True)
        g.wrote(a)
        g.emit(Op("iadd3", (a, b, c3), (o,), write=a, text=f"s{a} += s{b} + s{c3}; s{o} = s{a}"))
        # ... then b read again
        o2 = g.add_slot(shape)
        g.emit(Op("mul", (b, o), (o2,), text=f"s{o2} = s{b} * s{o}  # reads s{b} again"))
        return
    if kind in ("iadd", "imul", "add_"):
        o = g.add_slot(shape, like=a, alias=True)
        g.wrote(a)
        sym = {"iadd": f"s{a} += s{b}", "imul": f"s{a} *= s{b}", "add_": f"s{a}.add_(s{b})"}[kind]
        g.emit(Op(kind, (a, b), (o,), write=a, text=f"{sym}; s{o} = s{a}"))
        return
    o = g.add_slot(shape)
    alpha = r.choice([0.5, 2.5, -1.0])
    args = {"alpha": alpha} if kind == "add_alpha" else {}
    sym = {"add": f"s{a} + s{b}", "sub": f"s{a} - s{b}", "mul": f"s{a} * s{b}",
           "add_alpha": f"torch.add(s{a}, s{b}, alpha={alpha})"}[kind]
    g.emit(Op(kind, (a, b), (o,), args=args, text=f"s{o} = {sym}"))


def _g_split(g: _Gen) -> None:
    pool = g.live(lambda s: s.shape[0] >= 2)
    if not pool:
        return
    i = g.pick(pool)
    c, h, w = g.slots[i].shape
    if c % 2 == 0 and g.rng.random() < 0.5:
        o1 = g.add_slot((c // 2, h, w), like=i, view=True, multi=True)
        o2 = g.add_slot((c // 2, h, w), like=i, view=True, multi=True)
        g.emit(Op("chunk", (i,), (o1, o2), text=f"s{o1}, s{o2} = s{i}.chunk(2, dim=1)"))
        return
    k = g.rng.randint(1, c - 1)
    o1 = g.add_slot((k, h, w), like=i, view=True, multi=True)
    o2 = g.add_slot((c - k, h, w), like=i, view=True, multi=True)
    g.emit(Op("split", (i,), (o1, o2), args={"k": k, "c": c}, text=f"s{o1}, s{o2} = s{i}.split([{k}, {c - k}], dim=1)"))


def _g_view(g: _Gen) -> None:
    r = g.rng
    i = g.pick(g.live())
    c, h, w = g.slots[i].shape
    kinds = ["flatten_round", "reshape_round", "transpose", "permute_linear", "flip", "slice_c"]
    kinds += ["shuffle"] if c % 2 == 0 else []
    kinds += ["slice_w"] if w >= 3 else []
    kind = r.choice(kinds)
    if kind == "slice_c" and c < 2:
        kind = "flip"
    view = kind in ("flatten_round", "reshape_round", "transpose", "slice_w", "slice_c")
    args: dict = {"chw": (c, h, w)}
    shape = (c, h, w)
    module = None
    if kind == "transpose":
        shape = (c, w, h)
    elif kind == "slice_w":
        shape = (c, h, w - 1)
    elif kind == "slice_c":
        lo = r.randint(0, c - 2)
        hi = r.randint(lo + 1, c)
        args.update(lo=lo, hi=hi)
        shape = (hi - lo, h, w)
    elif kind == "permute_linear":
        module = g.name("lin")
        cout = r.randint(2, MAX_C)
        g.model.add_module(module, nn.Linear(c, cout))
        shape = (cout, h, w)
    o = g.add_slot(shape, like=i, view=view)
    text = {
        "flatten_round": f"s{o} = s{i}.flatten(1).view(n, {c}, {h}, {w})",
        "reshape_round": f"s{o} = s{i}.reshape(n, {c * h}, {w}).reshape(n, {c}, {h}, {w})",
        "transpose": f"s{o} = s{i}.transpose(2, 3)",
        "permute_linear": f"s{o} = self.{module}(s{i}.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)",
        "flip": f"s{o} = s{i}.flip(-1)",
        "shuffle": f"s{o} = s{i}.reshape(n, 2, {c // 2}, {h}, {w}).transpose(1, 2).reshape(n, {c}, {h}, {w})",
        "slice_w": f"s{o} = s{i}[..., 1:]",
        "slice_c": f"s{o} = s{i}[:, {args.get('lo')}:{args.get('hi')}]",
    }[kind]
    g.emit(Op(kind, (i,), (o,), args=args, module=module, text=text))


def _g_gate(g: _Gen) -> None:
    r = g.rng
    i = g.pick(g.live())
    c, h, w = g.slots[i].shape
    o = g.add_slot((c, h, w))
    if r.random() < 0.5:
        name = g.name("se")
        g.model.add_module(name, nn.Conv2d(c, c, 1))
        g.emit(Op("se", (i,), (o,), module=name,
                  text=f"s{o} = s{i} * torch.sigmoid(self.{name}(F.adaptive_avg_pool2d(s{i}, 1)))"))
    else:
        g.emit(Op("spatial_gate", (i,), (o,), text=f"s{o} = s{i} * torch.sigmoid(s{i}.mean(1, keepdim=True))"))


def _g_const(g: _Gen) -> None:
    r = g.rng
    i = g.pick(g.live())
    c, h, w = g.slots[i].shape
    how = r.choice(["clamp", "clamp", "add", "mul", "maximum"])
    name = g.name("buf")
    shape = (1, c, 1, 1) if how == "add" else (1, 1, h, w)
    g.model.register_buffer(name, torch.randn(shape) * 0.5)
    o = g.add_slot((c, h, w))
    sym = {"clamp": f"torch.clamp(s{i}, min=self.{name})", "add": f"s{i} + self.{name}",
           "mul": f"s{i} * self.{name}", "maximum": f"torch.maximum(s{i}, self.{name})"}[how]
    g.emit(Op("const", (i,), (o,), args={"buf": name, "how": how}, text=f"s{o} = {sym}  # {name}: {shape}"))


def _g_mask(g: _Gen) -> None:
    i = g.pick(g.live())
    f = g.rng.choice(list(_MASK))
    o = g.add_slot(g.slots[i].shape)
    g.emit(Op("mask", (i,), (o,), args={"f": f}, text=f"s{o} = {_show(f, i)}"))


def _g_inplace_misc(g: _Gen) -> None:
    """``keep = t; t += 0.5`` (both read later), or ``t[:, :k] = v``."""
    r = g.rng
    pool = [i for i in g.live() if g.writable(i)]
    if not pool:
        return
    t = g.pick(pool)
    shape = g.slots[t].shape
    if r.random() < 0.5:
        keep = g.add_slot(shape, like=t, alias=True)
        g.emit(Op("alias", (t,), (keep,), text=f"s{keep} = s{t}  # keep = t"))
        o = g.add_slot(shape, like=t, alias=True)
        g.wrote(t)
        g.emit(Op("iadd_const", (t,), (o,), write=t, text=f"s{t} += 0.5; s{o} = s{t}"))
        return
    donors = g.live(lambda s: s.shape[1:] == shape[1:] and s.group != g.slots[t].group)
    if not donors:
        return
    v = r.choice(donors)
    k = r.randint(1, min(shape[0], g.slots[v].shape[0]))
    o = g.add_slot(shape, like=t, alias=True)
    g.wrote(t)
    g.emit(Op("setitem", (t, v), (o,), args={"k": k}, write=t, text=f"s{t}[:, :{k}] = s{v}[:, :{k}]; s{o} = s{t}"))


def _g_shape_write(g: _Gen) -> None:
    """``z = x.new_zeros(x.shape); z.index_add_(1, idx, x[:, :k])``, ``torch.zeros_like(x).add_(...)``,
    ``x.new_empty(x.shape).copy_(x.flip(1))``: a new slot (no slot is written)."""
    r = g.rng
    i = g.pick(g.live())
    shape = g.slots[i].shape
    how = r.choice(["index_add_", "add_", "copy_"])
    k = r.randint(1, shape[0])
    o = g.add_slot(shape)
    g.emit(Op("shape_write", (i,), (o,), args={"how": how, "k": k},
              text=f"s{o} = a tensor made from s{i}'s shape, written in place by {how} (k={k})"))


def _g_opaque(g: _Gen) -> None:
    r = g.rng
    i = g.pick(g.live())
    c, h, w = g.slots[i].shape
    bodies = ["block", "bn_drop"] + (["write_input", "relu_input"] if g.writable(i) else [])
    body = r.choice(bodies)
    cout = c if body != "block" else r.choice([c, r.randint(2, MAX_C)])
    k = r.randint(1, c) if body == "write_input" else 0
    name = g.name("wrap")
    mod = Opaque(body, c, cout, k, r.choice(["data", "shape"]))
    if body in ("block", "bn_drop"):
        with torch.no_grad():
            mod.bn.running_mean.uniform_(-0.3, 0.3)
            mod.bn.running_var.uniform_(0.5, 1.5)
    g.model.add_module(name, mod)
    if body in ("write_input", "relu_input"):
        o = g.add_slot((cout, h, w)) if body == "write_input" else g.add_slot((c, h, w), like=i, alias=True)
        g.wrote(i)
        what = f"s{i}[:, :{k}] = relu(conv(s{i}))[:, :{k}]" if body == "write_input" else f"F.relu(s{i}, inplace=True)"
        g.emit(Op("opaque", (i,), (o,), module=name, write=i,
                  text=f"s{o} = self.{name}(s{i})  # untraceable ({mod.cond}): {what}"))
        return
    g.hookable.append(name)
    o = g.add_slot((cout, h, w))
    g.emit(Op("opaque", (i,), (o,), module=name, text=f"s{o} = self.{name}(s{i})  # untraceable ({mod.cond}) {body}"))


_RULES = [(_g_conv, 5), (_g_pool, 2), (_g_act, 5), (_g_norm, 2), (_g_binary, 4), (_g_split, 1), (_g_view, 2),
          (_g_gate, 1), (_g_const, 1), (_g_mask, 1), (_g_inplace_misc, 1), (_g_opaque, 1.5), (_g_shape_write, 0.7)]


def _attach_hooks(g: _Gen) -> None:
    for name in g.hookable:
        if g.rng.random() < 0.15:
            mod = g.model.get_submodule(name)
            hook = g.rng.choice([ScaleHook, FlipHook, ObserveHook, PreScaleHook, PreObserveHook])()
            if isinstance(hook, (PreScaleHook, PreObserveHook)):
                mod.register_forward_pre_hook(hook)
            else:
                mod.register_forward_hook(hook)


def _map_layers(model: GenModel) -> list[str]:
    """Module names whose output (called once) is a 4D map, in execution order."""
    seen: dict[str, list] = {}

    def note(name: str):  # noqa: ANN202
        return lambda _m, _i, o: seen.setdefault(name, []).append(o.dim() if isinstance(o, torch.Tensor) else None)

    handles = [m.register_forward_hook(note(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *IMAGE, dtype=torch.float64))
    finally:
        for h in handles:
            h.remove()
    return [n for n, dims in seen.items() if dims == [4]]


def generate(seed: int, *, n_ops: tuple[int, int] = (4, 11)) -> GenModel:
    """A random small CNN (float64, seeded weights) for ``seed``; ``model.layers`` holds the
    layers to project from (4D-map modules, then ``head``: the model's output)."""
    torch.manual_seed(seed)
    g = _Gen(seed)
    steps = g.rng.randint(*n_ops)
    funcs, weights = zip(*_RULES)
    while len(g.model.program) < steps:
        g.rng.choices(funcs, weights)[0](g)
    live = g.live()
    last = live[-1]
    c = g.slots[last].shape[0]
    g.model.add_module("head", nn.Linear(c, CLASSES))
    g.hookable.append("head")
    o = g.add_slot((CLASSES, 1, 1))
    g.emit(Op("head", (last,), (o,), module="head",
              text=f"s{o} = self.head(torch.flatten(F.adaptive_avg_pool2d(s{last}, 1), 1))"))
    g.model.n_slots = len(g.slots)
    g.model.result = o
    _attach_hooks(g)
    model = g.model.double().eval()
    model.layers = _map_layers(model) + ["head"]
    if g.rng.random() < 0.25:
        model.train()
    return model
