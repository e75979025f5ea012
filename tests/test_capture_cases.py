"""The named models of issue 20, each held to the capture contract (``tests/capture_contract.py``).

Each projection equals the float64 oracle (run on the model's out-of-place twin where the
model writes in place) or is refused with a typed zfvis error whose message does not
misreport the cause; the model (parameters, buffers, running statistics, training flags,
hooks) is never changed. Written by hand, as a model's author writes them, so that what zfvis
reads of the source is what real models hold.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from capture_contract import (
    INPUT_SIZE_HINT,
    RTOL,
    ContractViolation,
    Outcome,
    Query,
    assert_unchanged,
    check_occlusion,
    check_projection,
    refused_or_exact,
    rel_error,
    snapshot,
    strongest_map_channel,
)
from oracle import RULES, oracle_activation
from torch import nn

from zfvis import Deconvnet
from zfvis.io.errors import ZfvisError

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny float64 tensors on a busy machine


def _ready(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights, non-trivial batch-norm statistics, float64, eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model.double().eval()


def _images(n: int = 1, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _queries(layer: str, channel: int, rules=RULES, top_k: int = 4) -> list[Query]:
    out = []
    for rule in rules:
        out += [Query(layer, channel, rule=rule), Query(layer, channel, top_k=top_k, rule=rule),
                Query(layer, channel, "all", rule=rule)]
    return out


def _run(model: nn.Module, x: torch.Tensor, layer: str, *, ref: nn.Module | None = None, channel: int | None = None,
         queries: list[Query] | None = None) -> list[Outcome]:  # fmt: skip
    """Every query through the contract (the first violation fails the test); the outcomes."""
    ref = ref if ref is not None else model
    before = snapshot(model)
    try:
        dn = Deconvnet(model)
    except ZfvisError as err:
        assert_unchanged(model, before, "Deconvnet(model)")
        return [Outcome("refused", str(err), err)]
    except Exception as err:
        raise ContractViolation(f"Deconvnet(model): untyped {type(err).__name__}: {err}") from err
    assert_unchanged(model, before, "Deconvnet(model)")
    _check_output(dn, model, x, layer, ref)
    c = strongest_map_channel(ref, x, layer) if channel is None else channel
    return [check_projection(dn, model, x, q, ref=ref) for q in (queries or _queries(layer, c))]


def _check_output(dn: Deconvnet, model: nn.Module, x: torch.Tensor, layer: str, ref: nn.Module) -> None:
    """The layer's forward value (``Deconvnet.output``) is the model's own, or refused."""
    before = snapshot(model)
    try:
        got = dn.output(x, layer)
    except ZfvisError:
        assert_unchanged(model, before, f"output(x, {layer!r})")
        return
    except Exception as err:
        raise ContractViolation(f"output(x, {layer!r}): untyped {type(err).__name__}: {err}") from err
    assert_unchanged(model, before, f"output(x, {layer!r})")
    want = oracle_activation(ref, x, layer)
    err = rel_error(got, want)
    if err > RTOL:
        raise ContractViolation(f"output(x, {layer!r}): the forward value is wrong, rel error {err:.3g}")


class _Classifier(nn.Module):
    """``stem`` (3 -> 6 maps), ``middle`` (the construct under test), ``head`` (a map layer),
    then a linear classifier, so that occlusion runs on it too."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.head = nn.Conv2d(c, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv1(x))

    def classify(self, m: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.head(m), 1).flatten(1))


# --------------------------------------------------------------------------- the oracle itself


def test_the_oracle_runs_the_models_hooks() -> None:
    """The ground truth includes what hooks do (the model's true output does), and a hook added
    after an oracle call is seen by the next one."""
    model = _ready(_Chain(), seed=1)
    x = _images(1)
    plain = oracle_activation(model, x, "conv3")
    handle = model.conv1.register_forward_hook(_times3)
    try:
        with torch.no_grad():
            own = model(x)
        hooked = oracle_activation(model, x, "conv3")
    finally:
        handle.remove()
    assert torch.equal(hooked, own) and not torch.allclose(hooked, plain)
    assert torch.equal(oracle_activation(model, x, "conv3"), plain)  # the hook is gone again


# --------------------------------------------------------------------------- the five of the table


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.pool(F.relu(self.conv2(F.relu(self.conv1(x))))))


def _times3(_m: nn.Module, _i: tuple, o: torch.Tensor) -> torch.Tensor:
    return o * 3


def _mirror(_m: nn.Module, _i: tuple, o: torch.Tensor) -> torch.Tensor:
    return o.flip(-1)


def _halve_input(_m: nn.Module, args: tuple) -> tuple:
    return (args[0] * 0.5,)


@pytest.mark.parametrize("hooked", ["conv1", "conv2", "conv3"])
@pytest.mark.parametrize("hook", ["o * 3", "o.flip(-1)", "pre-hook: x * 0.5"])
def test_a_forward_hook_that_changes_the_output_is_part_of_the_model(hook: str, hooked: str) -> None:
    model = _ready(_Chain(), seed=1)
    module = model.get_submodule(hooked)
    if hook.startswith("pre"):
        module.register_forward_pre_hook(_halve_input)
    else:
        module.register_forward_hook(_times3 if hook == "o * 3" else _mirror)
    x = _images(2)
    for layer in ("conv3", hooked) if hooked != "conv3" else ("conv3",):
        _run(model, x, layer)


class _SumInPlace(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.conv_b, self.conv_c = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
        self.out_of_place = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = self.conv_b(a)
        c = self.conv_c(a)
        if self.out_of_place:
            a = a + (b + c)
        else:
            a += b + c
        return self.classify(F.relu(a) * b)  # b read again


def _twin(model: nn.Module) -> nn.Module:
    import copy

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "out_of_place"):
            m.out_of_place = True
    return twin


def test_a_sum_added_in_place_leaves_its_operands_as_they_were() -> None:
    """``a += b + c``, then ``b`` read again: only ``a`` is written."""
    model = _ready(_SumInPlace(), seed=2)
    ref = _twin(model)
    x = _images(2)
    _run(model, x, "head", ref=ref)
    _run(model, x, "fc", ref=ref, queries=[Query("fc", 1, rule=r) for r in RULES])
    check_occlusion(model, x[0], "head", 1, ref=ref, patch=3, stride=3)


class _Writer(nn.Module):
    """fx cannot trace it (it branches on the data); it writes into its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.out_of_place = False
        self.written: torch.Tensor | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.sum() > -1e9:
            if self.out_of_place:
                self.written = torch.cat([F.relu(self.conv(y))[:, :4], y[:, 4:]], dim=1)
            else:
                y[:, :4] = F.relu(self.conv(y))[:, :4]
        return y.mean()


class _WritesThrough(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.writer = _Writer()
        self.out_of_place = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        self.writer(y)  # result unused
        if self.out_of_place:
            y, self.writer.written = self.writer.written, None
        return self.classify(y)


def test_an_untraceable_submodule_writing_into_its_input_is_run() -> None:
    model = _ready(_WritesThrough(), seed=3)
    ref = _twin(model)
    x = _images(2)
    _run(model, x, "head", ref=ref)
    check_occlusion(model, x[0], "head", 2, ref=ref, patch=3, stride=3)


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace it
            return self.drop(F.relu(self.bn(self.conv(x))))
        return x


class _TrainMode(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Opaque()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.bn(self.block(self.stem(x))))


def test_a_model_in_train_mode_is_projected_with_eval_semantics_or_refused_and_left_as_it_was() -> None:
    model = _ready(_TrainMode(), seed=4).train()
    x = _images(2)
    for layer in ("block", "head"):
        _run(model, x, layer)  # the oracle runs in eval mode; the snapshot holds running stats and flags
    assert model.training and model.block.bn.training and model.block.drop.training
    check_occlusion(model, x[0], "head", 1, patch=3, stride=3)
    assert model.training and model.block.bn.training


class _Attention(_Classifier):
    """PyTorch's own leaf without an entry (reversed by calling it again), with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, dropout=0.5, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x)
        q = t.flatten(2).transpose(1, 2)
        a, _ = self.attn(q, q, q, need_weights=False)
        return self.classify(a.transpose(1, 2).reshape(t.shape))


def test_a_pytorch_leaf_in_train_mode_is_reversed_with_eval_semantics() -> None:
    model = _ready(_Attention(), seed=5).train()
    _run(model, _images(2), "head")
    assert model.training and model.attn.training


class _Floor(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.register_buffer("floor", torch.linspace(-0.5, 0.5, size * size).reshape(1, 1, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv1(x)
        t = torch.clamp(t, min=self.floor)
        return self.conv2(t)


@pytest.mark.parametrize("one_seed", [False, True])
def test_a_constant_broadcast_against_the_map_takes_each_seeds_part_of_it(one_seed: bool) -> None:
    """``torch.clamp(t, min=buf)`` with ``buf`` (1, 1, H, W): 49 seeds at once (``top_k=49``),
    or every position alone."""
    size = 10
    model = _ready(_Floor(size), seed=5)
    x = _images(1, size, seed=5)
    if one_seed:
        queries = [Query("conv2", 1, (y, xx), rule="deconvnet") for y in range(size) for xx in range(size)]
    else:
        queries = [Query("conv2", 1, top_k=49, rule=r) for r in RULES]
    _run(model, x, "conv2", channel=1, queries=queries)


# --------------------------------------------------------------------------- misreported


class _Masked(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv1(x)
        if self.how == "where":
            t = torch.where(t > 0, t, 0.1 * t)
        elif self.how == "masked_fill":
            t = t.masked_fill(t < 0, 0.0)
        elif self.how == "mask_product":
            t = t * (t > 0).float()
        elif self.how == "last_columns":
            t = t[..., 1:]
        return self.conv2(t)


@pytest.mark.parametrize("how", ["where", "masked_fill", "mask_product"])
def test_a_mask_is_exact(how: str) -> None:
    """A mask carries no signal (its gradient is zero), on a batch of two: exact, not "does the
    model expect another input size?"."""
    model = _ready(_Masked(how), seed=6)
    for outcome in _run(model, _images(2), "conv2"):
        assert outcome.status == "exact", outcome.message


def test_indexing_the_last_columns_is_not_indexing_the_batch() -> None:
    model = _ready(_Masked("last_columns"), seed=7)
    for outcome in _run(model, _images(2), "conv2"):
        assert outcome.status == "exact", outcome.message


class _KeepThenAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.out_of_place = False

    def middle(self, t: torch.Tensor) -> torch.Tensor:
        if self.out_of_place:
            t = t + 0.5
            return F.relu(t) * 2 + t
        keep = t
        t += 0.5
        return F.relu(keep) * 2 + t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.middle(self.conv1(x)))


def test_an_alias_sees_the_write_through_the_name_it_shares() -> None:
    """``keep = t; t += 0.5; return F.relu(keep) * 2 + t`` (last round's remaining case)."""
    model = _ready(_KeepThenAdd(), seed=8)
    _run(model, _images(2), "conv2", ref=_twin(model))


class _DropoutAlias(nn.Module):
    """In eval mode dropout returns its input itself: a write through its output writes the input."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.out_of_place = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.out_of_place:  # the twin: what eval mode computes
            y = F.elu(y)
            return self.conv2(torch.cat([y, y], dim=1))
        d = F.dropout(y, 0.3, self.training) if self.functional else self.drop(y)
        F.elu(d, inplace=True)
        return self.conv2(torch.cat([d, y], dim=1))  # y is d: it reads the ELU too


@pytest.mark.parametrize("functional", [True, False])
def test_a_write_through_dropouts_output_in_eval_mode_writes_its_input(functional: bool) -> None:
    """Found by the property test (seed 445): ``d = dropout(y)`` in eval mode is ``y``."""
    model = _ready(_DropoutAlias(functional), seed=13)
    _run(model, _images(2), "conv2", ref=_twin(model))


# --------------------------------------------------------------------------- attention in a conv net


class _SharedQKV(nn.Module):
    """timm's ``Attention``: one qkv projection, ``permute(2, 0, 3, 1, 4)``, ``unbind(0)``."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Windowed(nn.Module):
    """Swin / MaxViT: ``x.view(-1, ws, ws, C)`` windows, attention inside each."""

    def __init__(self, dim: int, ws: int = 2) -> None:
        super().__init__()
        self.ws = ws
        self.attn = _SharedQKV(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        B, H, W, C = x.shape
        ws = self.ws
        w = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)
        w = self.attn(w.view(-1, ws * ws, C)).view(-1, ws, ws, C)
        w = w.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous()
        return w.view(B, H, W, C)


class _HeadsInBatch(nn.Module):
    """BoTNet: ``reshape(B * heads, dh, H * W)``."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(dim, dim * 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        q, k, v = torch.split(self.qkv(x), [C, C, C], dim=1)
        q = q.reshape(B * self.heads, C // self.heads, H * W).transpose(-1, -2)
        k = k.reshape(B * self.heads, C // self.heads, H * W)
        v = v.reshape(B * self.heads, C // self.heads, H * W).transpose(-1, -2)
        attn = (q @ k / math.sqrt(C // self.heads)).softmax(dim=-1)
        return (attn @ v).transpose(-1, -2).reshape(B, C, H, W)


class _Columns(nn.Module):
    """Axial attention along each column: ``reshape(-1, H, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = _SharedQKV(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        t = x.permute(0, 3, 2, 1).reshape(-1, H, C)
        t = self.attn(t)
        return t.reshape(B, W, H, C).permute(0, 3, 2, 1)


class _AttentionNet(nn.Module):
    def __init__(self, kind: str, dim: int = 8) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, dim, 3, padding=1)
        self.block = {"shared_qkv": lambda: _SharedQKV(dim), "windows": lambda: _Windowed(dim),
                      "heads_in_batch": lambda: _HeadsInBatch(dim), "columns": lambda: _Columns(dim)}[kind]()
        self.conv2 = nn.Conv2d(dim, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.relu(self.conv1(x))
        B, C, H, W = t.shape
        if self.kind == "shared_qkv":
            s = self.block(t.flatten(2).transpose(1, 2))
            t = t + s.transpose(1, 2).reshape(B, C, H, W)
        elif self.kind == "windows":
            t = t + self.block(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            t = t + self.block(t)
        return self.conv2(t)


@pytest.mark.parametrize("kind", ["shared_qkv", "windows", "heads_in_batch", "columns"])
def test_attention_in_a_conv_net_is_exact(kind: str) -> None:
    """Each image's part of the computation has a true backward: exact on a batch of two
    (windows and heads folded into the batch, q, k and v unbound before it)."""
    model = _ready(_AttentionNet(kind), seed=9)
    x = _images(2, 8)
    outcomes = _run(model, x, "conv2")
    # each image's computation is independent: exact (a refusal would be a batch refusal the issue rules out)
    assert {o.status for o in outcomes} == {"exact"}, next((o.message for o in outcomes if o.message), "")


class _ExtraArgs(nn.Module):
    def __init__(self, uses_them: bool) -> None:
        super().__init__()
        self.uses_them = uses_them
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        t = F.relu(self.conv1(x))
        if self.uses_them:
            if attn_mask is not None:
                t = t * attn_mask
            if is_causal:
                t = t.flip(-1)
        return self.conv2(t)


@pytest.mark.parametrize("uses_them", [False, True])
def test_optional_forward_arguments_are_left_at_their_defaults(uses_them: bool) -> None:
    """Not refused as "takes 3 inputs": it projects, exactly (whether ``forward`` reads the
    optional arguments or not)."""
    model = _ready(_ExtraArgs(uses_them), seed=10)
    outcomes = _run(model, _images(2), "conv2")
    assert all(o.status == "exact" for o in outcomes), [o.message for o in outcomes if o.status != "exact"][:1]


class _Video(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


@pytest.mark.parametrize("frames", [4, None])
def test_a_video_model_is_refused_as_unsupported(frames: int | None) -> None:
    """A 3D-convolution model, given clips (N, C, T, H, W) or images: a typed error that says
    3D / video models are unsupported, not an input-shape complaint."""
    model = _ready(_Video(), seed=11)
    x = torch.randn(1, 3, *((frames,) if frames else ()), 8, 8, dtype=torch.float64)
    before = snapshot(model)
    with pytest.raises(ZfvisError) as info:
        Deconvnet(model).project(x, "conv2", 0)
    assert_unchanged(model, before, "video")
    refused_or_exact(Outcome("refused", str(info.value)), must_say=["3d", "3-d", "video"])


# --------------------------------------------------------------------------- timm hybrids


TIMM = {  # name: (create_model kwargs, input size, layer after an attention block)
    "mobilevit_xxs": ({}, 32, "stages.3"),
    "edgenext_xx_small": ({}, 64, "stages.2"),
    "maxvit_pico_rw_256": ({"img_size": 64}, 64, "stages.1"),
    "botnet26t_256": ({"img_size": 64}, 64, "stages.3"),
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_hybrids_with_attention_are_exact(name: str) -> None:
    timm = pytest.importorskip("timm")
    kwargs, size, layer = TIMM[name]
    torch.manual_seed(12)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).double().eval()
    x = _images(2, size, seed=12)
    c = strongest_map_channel(model, x, layer)
    outcomes = _run(model, x, layer, queries=[Query(layer, c, rule=r) for r in RULES] + [Query(layer, c, top_k=2)])
    assert {o.status for o in outcomes} == {"exact"}, next((o.message for o in outcomes if o.message), "")
