"""The graph checked against what the model ran (zfvis.core.capture), against the oracle.

Each model here does something a symbolic trace cannot see as it ran: a hook that changes
a module's output, an in-place write that only the model's own run shows (its source text
is not even available), a submodule that writes into a tensor it did not make, batches
folded into windows or heads. Each projection is compared in float64 with the autograd
oracle (``tests/oracle.py``, which never imports zfvis), or must be refused with a typed
error naming the node; the model is never changed.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zfvis
from zfvis.core import capture
from zfvis.io.errors import CaptureMismatchError, UnsupportedModelError

from oracle import oracle_projection, oracle_whole_map

TOL = 1e-10


def _state(model: nn.Module) -> tuple:
    hooks = tuple((len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules())
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()], hooks)


def _assert_unchanged(model: nn.Module, before: tuple) -> None:
    values, flags, hooks = _state(model)
    assert flags == before[1] and hooks == before[2]
    assert values.keys() == before[0].keys()
    assert all(torch.equal(values[k], before[0][k]) for k in values)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _exact(model: nn.Module, layer: str, *, batch: int = 1, channel: int = 1, twin: nn.Module | None = None,
           rule: str = "deconvnet", size: int = 8) -> None:
    """Every image's whole-map projection equals the oracle's (on ``twin`` where given)."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    before = _state(model)
    got = zfvis.Deconvnet(model).project(x, layer, channel, position="all", rule=rule)
    _assert_unchanged(model, before)
    for i in range(batch):
        want = oracle_whole_map(twin or model, x[i:i + 1], layer, channel, rule)
        assert want.abs().max() > 0
        assert _rel(got[i], want) < TOL, f"image {i}"


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.c1(x)))


HOOKS = {
    "scale": ("forward", lambda m, i, o: o * 3),
    "flip": ("forward", lambda m, i, o: o.flip(-1)),
    "observe": ("forward", lambda m, i, o: None),
    "pre-scale": ("pre", lambda m, i: (i[0] * 2,)),
}


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_a_hook_is_part_of_what_the_module_computes(hook: str, rule: str) -> None:
    model = _Two().double().eval()
    kind, fn = HOOKS[hook]
    handle = (model.c1.register_forward_hook if kind == "forward" else model.c1.register_forward_pre_hook)(fn)
    try:
        _exact(model, "c2", rule=rule)
    finally:
        handle.remove()


@pytest.mark.parametrize("rule", ["deconvnet", "gradient"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_global_module_hook_is_part_of_what_each_module_computes(kind: str, rule: str) -> None:
    """``register_module_forward_hook`` runs on every module's call: the reverse pass follows it
    (it was ignored: rel 0.33 against the oracle, no error)."""
    from torch.nn.modules import module as mod

    model = _Two().double().eval()

    def first(m: nn.Module) -> bool:  # c1, also in the oracle's copy of the model
        return isinstance(m, nn.Conv2d) and m.out_channels == 4

    if kind == "forward":
        handle = mod.register_module_forward_hook(lambda m, i, o: o * 1.5 if first(m) else None)
    else:
        handle = mod.register_module_forward_pre_hook(lambda m, i: (i[0].flip(-1),) if first(m) else None)
    try:
        _exact(model, "c2", rule=rule)
    finally:
        handle.remove()


def test_a_verdict_is_made_again_when_hooks_change() -> None:
    model = _Two().double().eval()
    dn = zfvis.Deconvnet(model)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    plain = dn.project(x, "c2", 1, position="all")
    handle = model.c1.register_forward_hook(lambda m, i, o: o * 3)
    try:
        hooked = dn.project(x, "c2", 1, position="all")
        assert _rel(hooked[0], oracle_whole_map(model, x, "c2", 1)) < TOL
    finally:
        handle.remove()
    again = dn.project(x, "c2", 1, position="all")
    assert _rel(again, plain) < TOL and _rel(hooked, plain) > 0.1
    assert len(dn.graph.verdicts) == 2  # one per set of hooks: the first was kept, not remade


def test_a_verdict_is_cached_per_input_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    dn = zfvis.Deconvnet(_Two().double().eval())
    calls = []
    real = capture.run_model
    monkeypatch.setattr(capture, "run_model", lambda *a: calls.append(1) or real(*a))
    for size in (8, 8, 9, 8):
        dn.project(torch.randn(1, 3, size, size, dtype=torch.float64), "c2", 0)
    assert len(calls) == 2


class _ChannelsLastNorm(_Two):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # permute, LayerNorm, permute: checked, no graph kept
        y = self.c1(x).permute(0, 2, 3, 1)
        return self.c2(F.relu(F.layer_norm(y, (4,)).permute(0, 3, 1, 2)))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_gradient_check_of_one_image_runs_once_per_input_key(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    from zfvis.core.ops import grad

    checked: list[str] = []
    real = grad._check_gradient
    monkeypatch.setattr(grad, "_check_gradient",
                        lambda site, *a, **k: checked.append(site.node.name) or real(site, *a, **k))
    model = _ChannelsLastNorm().double().eval()
    dn = zfvis.Deconvnet(model)
    counts = []
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
        checked.clear()
        got = dn.project(x, "c2", 1, position="all")
        counts.append(len(checked))
        for i in range(batch):  # exact on every pass, checked or not
            assert _rel(got[i], oracle_whole_map(model, x[i:i + 1], "c2", 1)) < TOL
    # one image: only the code decides the check, once per key; several: values could hide mixing
    assert counts == ([3, 0, 0] if batch == 1 else [3, 3, 3])


def test_a_verdict_names_the_nodes_that_ran_a_random_call() -> None:
    class Noisy(_Two):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(F.rrelu(self.c1(x), 0.1, 0.1, training=True))  # random draws, one slope

    dn = zfvis.Deconvnet(Noisy().double().eval())
    dn.record(torch.randn(1, 3, 8, 8, dtype=torch.float64), "c2")
    (verdict,) = dn.graph.verdicts.values()
    assert verdict.random == {"rrelu"} and "rrelu" not in verdict.gradient_checked


# An augmented assignment, in a class whose source text nobody can read (exec'd from a
# string): the in-place write is known from what ran, not from the line it is on.
_SOURCE = textwrap.dedent("""
    class Augmented(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.c3 = nn.Conv2d(4, 4, 3, padding=1)
            self.out = nn.Conv2d(4, 5, 3, padding=1)

        def forward(self, x):
            a = F.relu(self.c1(x)); b = F.relu(self.c2(a)); c = self.c3(a); keep = a
            a += b + c
            return self.out(F.relu(keep) * 2 + b)

    class Twin(Augmented):
        def forward(self, x):
            a = F.relu(self.c1(x)); b = F.relu(self.c2(a)); c = self.c3(a)
            a = a + (b + c)
            return self.out(F.relu(a) * 2 + b)
""")


def test_in_place_writes_come_from_what_ran_not_from_source_text() -> None:
    scope: dict = {"nn": nn, "F": F}
    exec(compile(_SOURCE, "<no source>", "exec"), scope)  # noqa: S102 - a model without source text
    model = scope["Augmented"]().double().eval()
    twin = scope["Twin"]().double().eval()
    twin.load_state_dict(model.state_dict())
    _exact(model, "out", twin=twin)


class _Writer(nn.Module):
    """fx cannot trace it (it branches on a value); it writes into the tensor it is given."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.sum() > -1e9:
            y[:, :2] = F.relu(y[:, :2] * 2)
        return y.mean()


class _WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.w = _Writer()
        self.out = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        self.w(y)  # result unused: not an ancestor of anything
        return self.out(F.relu(y))


def test_an_untraceable_write_into_another_tensor_is_refused_naming_the_node() -> None:
    model = _WritesItsInput().double().eval()
    before = _state(model)
    dn = zfvis.Deconvnet(model)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(CaptureMismatchError, match=r"node 'w' \(_Writer\).*overwrites in place memory that 'c1' shares and node 'relu' reads"):
        dn.project(x, "out", 0)
    assert dn.project(x, "c1", 0).shape == (1, 3, 8, 8)  # before it: fine
    _assert_unchanged(model, before)


class _Windows(nn.Module):
    """Swin-style windows folded into the batch, attention inside each window."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(4, 4)
        self.out = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x).permute(0, 2, 3, 1)
        b, h, w, c = y.shape
        win = y.view(b, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, c)
        att = (win @ win.transpose(1, 2)).softmax(-1) @ self.lin(win)
        y = att.view(b, h // 4, w // 4, 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return self.out(F.relu(y.permute(0, 3, 1, 2)))


class _Heads(nn.Module):
    """BoTNet-style heads folded into the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        b, c, h, w = y.shape
        q = y.reshape(b * 2, c // 2, h * w)
        return self.out(F.relu((q @ (q.transpose(1, 2) @ q).softmax(-1)).reshape(b, c, h, w)))


class _SharedQKV(nn.Module):
    """timm-style attention: q, k and v unbound from a permuted axis that comes before the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 12, 3, padding=1)
        self.out = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        b, c, h, w = y.shape
        qkv = y.flatten(2).transpose(1, 2).reshape(b, h * w, 3, 2, 2).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, 4)
        return self.out(F.relu(a.transpose(1, 2).reshape(b, 4, h, w)))


@pytest.mark.parametrize("batch", [1, 2, 3])  # 3: the qkv axis as long as the batch
@pytest.mark.parametrize("cls", [_Windows, _Heads, _SharedQKV], ids=lambda c: c.__name__)
def test_a_batch_folded_into_windows_or_heads_is_reversed_per_image(cls: type, batch: int) -> None:
    _exact(cls().double().eval(), "out", batch=batch)


class _Mixes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.c(x).transpose(0, 1).softmax(1).transpose(0, 1)))


def test_a_stretch_that_mixes_images_is_refused() -> None:
    dn = zfvis.Deconvnet(_Mixes().double().eval())
    with pytest.raises(UnsupportedModelError, match="mix the images of the batch"):
        dn.project(torch.randn(2, 3, 8, 8, dtype=torch.float64), "out", 0)


def test_a_layer_inside_a_folded_stretch_cannot_be_seeded() -> None:
    dn = zfvis.Deconvnet(_Heads().double().eval())
    with pytest.raises(UnsupportedModelError, match="node 'reshape'.*not the batch"):
        dn.project(torch.randn(1, 3, 8, 8, dtype=torch.float64), "matmul_1", 0)


class _Masks(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.c(x)
        if self.kind == "where":
            t = torch.where(t > 0, t, torch.zeros_like(t))
        elif self.kind == "masked_fill":
            t = t.masked_fill(t < 0, 0.0)
        else:
            t = t * (t > 0).to(t.dtype)
        return self.out(t[..., 1:])


@pytest.mark.parametrize("kind", ["where", "masked_fill", "gate"])
def test_masks_carry_no_signal(kind: str) -> None:
    _exact(_Masks(kind).double().eval(), "out")


class _Defaults(_Two):
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        y = self.c1(x)
        if attn_mask is not None:
            y = y + attn_mask
        return self.c2(F.relu(y * 2 if is_causal else y))


def test_forward_arguments_with_defaults_stay_at_their_defaults() -> None:
    _exact(_Defaults().double().eval(), "c2")


class _ConstantMap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 5, 3, padding=1)
        self.register_buffer("floor", torch.rand(1, 1, 8, 8) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.clamp(self.c(x), min=self.floor))


def test_a_pointwise_op_with_a_constant_map_is_not_cut_into_windows() -> None:
    model = _ConstantMap().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    dn = zfvis.Deconvnet(model)
    got = dn.project(x, "out", 1, top_k=49)[0]
    acts = dn.output(x, "out")[0, 1].flatten()
    order = acts.topk(49).indices
    for k in range(49):
        y, xx = divmod(int(order[k]), 8)
        assert _rel(got[k], oracle_projection(model, x, "out", (1, y, xx))) < TOL


def test_video_models_are_refused_as_such() -> None:
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="Conv3d.*video and volume models"):
        zfvis.Deconvnet(model)


class _Keeps(nn.Module):
    """fx cannot trace it; it keeps its output for another module to read later."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: torch.Tensor | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.sum() > -1e9:
            y = y * 2
            self.kept = y
        return y


class _ReadsKept(nn.Module):
    def __init__(self, keeper: _Keeps, traceable: bool) -> None:
        super().__init__()
        self.keeper, self.traceable = [keeper], traceable  # a list: not a submodule

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        kept = self.keeper[0].kept
        if self.traceable:  # fx bakes this branch in when it traces, before anything was kept
            return y + kept if kept is not None else y
        return y + kept if y.sum() > -1e9 else y  # fx cannot trace it: kept whole


class _KeptBetweenCalls(nn.Module):
    def __init__(self, traceable: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.keep = _Keeps()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.read = _ReadsKept(self.keep, traceable)
        self.out = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.keep(self.c1(x))
        return self.out(F.relu(self.read(self.c2(F.relu(y)))))


@pytest.mark.parametrize(("traceable", "message"), [
    (False, r"node 'read' \(_ReadsKept\).*reads a value made by node 'keep'"),
    (True, r"the model ran aten::add.Tensor where the graph runs"),
])
def test_a_value_kept_between_calls_is_refused(traceable: bool, message: str) -> None:
    """Read by a submodule kept whole: the read is caught; read by traced code: fx baked the
    branch it saw at trace time, and the model's own run differs from the graph's."""
    dn = zfvis.Deconvnet(_KeptBetweenCalls(traceable).double().eval())
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(CaptureMismatchError, match=message):
        dn.project(x, "out", 0)
    assert dn.project(x, "c1", 0).shape == (1, 3, 8, 8)  # before it: fine


def test_a_hook_on_a_container_is_traced_into_the_graph() -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), nn.Conv2d(4, 5, 3, padding=1))
    model = model.double().eval()
    handle = model[0].register_forward_hook(lambda m, i, o: o * 3)
    try:
        _exact(model, "1")
        assert "0.mul" in zfvis.Deconvnet(model).layer_names()
    finally:
        handle.remove()


class _BiasTable(nn.Module):
    """``table[index.view(-1)]`` with ``index`` a buffer, as torchvision's MaxViT: the trace
    takes the buffer's view once, as a constant, where the model views it on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.table = nn.Parameter(torch.randn(7, 4))
        self.register_buffer("index", torch.randint(0, 7, (8, 8)))
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table[self.index.view(-1)].view(8, 8, 4).permute(2, 0, 1)
        return self.c2(F.relu(self.c1(x) + bias))


def test_a_view_of_a_buffer_taken_once_by_the_trace_is_the_same_computation() -> None:
    torch.manual_seed(3)
    _exact(_BiasTable().double().eval(), "c2", batch=2)
