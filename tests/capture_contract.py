"""The capture contract (issue 20), as helpers shared by the capture tests.

For a model, an input and a query (layer, channel(s), position / top_k, rule),
``Deconvnet(model).project`` must either equal the float64 oracle (``tests/oracle.py``, run
on a reference model: the model itself, or its out-of-place twin where the model writes in
place) or raise a typed zfvis error (a :class:`zfvis.io.errors.ZfvisError`) with a message;
never a wrong answer, never an untyped exception. Whatever happens, the model is not
changed: its ``state_dict()`` (running statistics and ``num_batches_tracked`` included) bit
for bit, every module's training flag, plain attributes and hook dicts, and the global
module hooks.

:func:`check_projection` runs one query and returns an :class:`Outcome`; it raises
:class:`ContractViolation` (an ``AssertionError``) with the details otherwise.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Sequence

import torch
import torch.nn.modules.module as _module_mod
from oracle import oracle_activation, oracle_projection, oracle_whole_map
from torch import nn

from zfvis.io.errors import ZfvisError

RTOL = 1e-9  # float64 throughout: any honest difference is rounding
ATOL = 1e-13  # where the reference is (almost) all zero
#: Words that misreport a model the engine cannot follow as a wrong input size.
INPUT_SIZE_HINT = "does the model expect another input size"


class ContractViolation(AssertionError):
    """A wrong answer, an untyped exception or a changed model."""


@dataclasses.dataclass(frozen=True)
class Query:
    """One call of ``Deconvnet.project``."""

    layer: str
    channel: int | tuple[int, ...]
    position: tuple[int, int] | str | None = None
    top_k: int | None = None
    rule: str = "deconvnet"

    def __str__(self) -> str:
        extra = f", position={self.position!r}" if self.position is not None else ""
        extra += f", top_k={self.top_k}" if self.top_k is not None else ""
        ch = list(self.channel) if isinstance(self.channel, tuple) else self.channel
        return f"project(x, {self.layer!r}, {ch}{extra}, rule={self.rule!r})"


@dataclasses.dataclass
class Outcome:
    """What a call did: ``"exact"`` (equal to the oracle) or ``"refused"`` (a typed error)."""

    status: str
    message: str = ""
    error: ZfvisError | None = None


# --------------------------------------------------------------------------- state


def _global_hooks() -> dict[str, tuple]:
    return {
        k: tuple(v.items()) for k, v in vars(_module_mod).items() if k.startswith("_global_") and isinstance(v, dict)
    }


def _plain(v: object) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_plain(e) for e in v)
    return v is None or isinstance(v, (bool, int, float, str))


@dataclasses.dataclass
class Snapshot:
    """Everything a call must leave as it was."""

    state: dict[str, torch.Tensor]
    tensors: dict[str, tuple]  # identity, dtype, device, requires_grad, grad is None
    modules: dict[str, tuple]  # type, training, plain attributes, hook dict keys and hooks, attribute names
    global_hooks: dict[str, tuple]


def snapshot(model: nn.Module) -> Snapshot:
    """The model's state (copied) and identities, to compare after a call."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    tensors = {
        k: (id(v), v.dtype, v.device, v.requires_grad, v.grad is None)
        for k, v in model.state_dict(keep_vars=True).items()
    }
    modules = {}
    for name, m in model.named_modules():
        hooks = tuple(
            (k, tuple((hk, id(hv)) for hk, hv in v.items()))
            for k, v in sorted(vars(m).items())
            if "hook" in k and isinstance(v, dict)
        )
        attrs = tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and _plain(v)))
        modules[name] = (type(m), m.training, attrs, hooks, tuple(sorted(vars(m))))
    return Snapshot(state, tensors, modules, _global_hooks())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (so that -0.0 differs from 0.0 and NaN equals itself)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def changes(model: nn.Module, before: Snapshot) -> list[str]:
    """What differs between ``before`` and the model now (empty: unchanged)."""
    now = snapshot(model)
    out: list[str] = []
    if set(now.state) != set(before.state):
        out.append(f"state_dict keys changed: {sorted(set(now.state) ^ set(before.state))}")
    for k in sorted(set(now.state) & set(before.state)):
        a, b = before.state[k], now.state[k]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_bits(a), _bits(b)):
            out.append(f"state_dict[{k!r}] changed (was {a.flatten()[:3].tolist()}, now {b.flatten()[:3].tolist()})")
        elif before.tensors[k] != now.tensors[k]:
            out.append(f"state_dict[{k!r}]: object, dtype, device, requires_grad or .grad changed")
    for name in sorted(set(before.modules) | set(now.modules)):
        a, b = before.modules.get(name), now.modules.get(name)
        if a is None or b is None:
            out.append(f"module {name!r} {'added' if a is None else 'removed'}")
            continue
        for what, i in (("type", 0), ("training flag", 1), ("plain attributes", 2), ("hooks", 3),
                        ("attribute names", 4)):
            if a[i] != b[i]:
                out.append(f"module {name or '<root>'!r}: {what} changed ({a[i]!r} -> {b[i]!r})")
    if before.global_hooks != now.global_hooks:
        out.append("global module hooks changed")
    return out


def assert_unchanged(model: nn.Module, before: Snapshot, what: str = "") -> None:
    diff = changes(model, before)
    if diff:
        raise ContractViolation(f"{what}: the model was changed: " + "; ".join(diff[:6]))


# --------------------------------------------------------------------------- comparison


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (0 where both are within ATOL; inf on a shape mismatch)."""
    if tuple(ours.shape) != tuple(ref.shape):
        return float("inf")
    diff = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    if diff <= ATOL:
        return 0.0
    scale = ref.abs().max().item()
    return float("inf") if scale == 0.0 else diff / scale


def _order(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of a map sorted by value, largest first (ties: smaller index first)."""
    flat = act.reshape(-1)
    idx = torch.sort(flat, descending=True, stable=True).indices
    return idx, flat


def _channels(q: Query) -> list[int]:
    return list(q.channel) if isinstance(q.channel, tuple) else [q.channel]


def _expected_seed(ref: nn.Module, img: torch.Tensor, q: Query, c: int, act: torch.Tensor, got: torch.Tensor
                   ) -> list[torch.Tensor]:  # fmt: skip
    """The oracle's projections of one image and channel, matched to ``got`` (k, C, H, W) where
    the seeds' ranking has exact ties."""
    if act.dim() == 1:  # a vector layer: one unit
        return [oracle_projection(ref, img, q.layer, (c,), q.rule)]
    if q.position == "all":
        return [oracle_whole_map(ref, img, q.layer, c, q.rule)]
    w = act.shape[-1]
    if isinstance(q.position, tuple):
        return [oracle_projection(ref, img, q.layer, (c, *q.position), q.rule)]
    idx, flat = _order(act[c])
    out = []
    for r in range(q.top_k or 1):
        p = int(idx[r])
        want = oracle_projection(ref, img, q.layer, (c, p // w, p % w), q.rule)
        if rel_error(got[r], want) > RTOL:  # an exact tie ranked the other way round?
            v = flat[p]
            for alt in torch.nonzero((flat - v).abs() <= 1e-12 * max(1.0, abs(float(v)))).flatten().tolist():
                if alt != p:
                    other = oracle_projection(ref, img, q.layer, (c, alt // w, alt % w), q.rule)
                    if rel_error(got[r], other) <= RTOL:
                        want = other
                        break
        out.append(want)
    return out


def expected(ref: nn.Module, x: torch.Tensor, q: Query, got: torch.Tensor) -> torch.Tensor:
    """The oracle's answer to ``q`` in ``project``'s layout (N, [m], [k], C, H, W)."""
    per_image = []
    chans = _channels(q)
    shaped = got.reshape(x.shape[0], len(chans), q.top_k or 1, *x.shape[1:]) if got.numel() == x.shape[0] * len(
        chans) * (q.top_k or 1) * x[0].numel() else None
    for n in range(x.shape[0]):
        img = x[n : n + 1]
        act = oracle_activation(ref, img, q.layer)[0]
        rows = []
        for j, c in enumerate(chans):
            mine = shaped[n, j] if shaped is not None else torch.zeros(q.top_k or 1, *x.shape[1:], dtype=x.dtype)
            rows.append(torch.stack(_expected_seed(ref, img, q, c, act, mine)))
        per_image.append(torch.stack(rows))
    out = torch.stack(per_image)  # (N, m, k, C, H, W)
    if not isinstance(q.channel, tuple):
        out = out[:, 0]
    if q.top_k is None:
        out = out.select(-4, 0)
    return out


def check_projection(dn: object, model: nn.Module, x: torch.Tensor, q: Query, *, ref: nn.Module | None = None,
                     rtol: float = RTOL) -> Outcome:
    """Runs ``dn.project`` for ``q`` and holds it to the contract.

    Args:
        dn: A ``zfvis.Deconvnet`` on ``model``.
        model: The model (checked unchanged after the call).
        x: The input batch (N, C, H, W), float64.
        q: The query.
        ref: The model the oracle runs (its out-of-place twin where ``model`` writes in place);
            default ``model``.

    Returns:
        ``Outcome("exact")`` or ``Outcome("refused", message, error)``.

    Raises:
        ContractViolation: A wrong answer, an untyped exception or a changed model.
    """
    before = snapshot(model)
    images = x.clone()
    ch = list(q.channel) if isinstance(q.channel, tuple) else q.channel
    try:
        got = dn.project(x, q.layer, ch, position=q.position, top_k=q.top_k, rule=q.rule)  # type: ignore[attr-defined]
    except ZfvisError as err:
        assert_unchanged(model, before, str(q))
        _same_images(x, images, q)
        msg = str(err).strip()
        if not msg:
            raise ContractViolation(f"{q}: {type(err).__name__} without a message") from err
        return Outcome("refused", msg, err)
    except Exception as err:  # noqa: BLE001 - the contract: nothing untyped
        tb = "".join(traceback.format_exception(err)[-3:])
        first = str(err).splitlines()[0] if str(err) else ""
        raise ContractViolation(f"{q}: untyped {type(err).__name__}: {first}\n{tb}") from err
    found = [f"the model was changed: {'; '.join(diff[:6])}" for diff in [changes(model, before)] if diff]
    if not torch.equal(x, images):
        x.copy_(images)  # (so that the next query starts from the same images)
        found.append("the input images were changed")
    want = expected(ref if ref is not None else model, x, q, got)
    err = rel_error(got, want)
    if err > rtol:
        found.append(f"wrong answer, rel error {err:.3g} against the oracle (shape {tuple(got.shape)} vs "
                     f"{tuple(want.shape)})")
    if found:
        raise ContractViolation(f"{q}: " + "; ".join(found))
    return Outcome("exact")


def _same_images(x: torch.Tensor, before: torch.Tensor, q: Query) -> None:
    if not torch.equal(x, before):
        x.copy_(before)  # (so that the next query starts from the same images)
        raise ContractViolation(f"{q}: the input images were changed")


def refused_or_exact(outcome: Outcome, *, must_not_say: Sequence[str] = (), must_say: Sequence[str] = ()) -> None:
    """Checks a refusal's words (case-insensitive): none of ``must_not_say``, one of ``must_say``."""
    if outcome.status != "refused":
        return
    low = outcome.message.lower()
    for bad in must_not_say:
        if bad.lower() in low:
            raise ContractViolation(f"misleading refusal (it says {bad!r}): {outcome.message}")
    if must_say and not any(w.lower() in low for w in must_say):
        raise ContractViolation(f"the refusal names none of {list(must_say)}: {outcome.message}")


def strongest_map_channel(ref: nn.Module, x: torch.Tensor, layer: str) -> int:
    """The channel holding the largest activation of ``layer`` for image 0 (per the oracle)."""
    act = oracle_activation(ref, x[:1], layer)[0]
    return int(act.reshape(act.shape[0], -1).amax(dim=1).argmax())


def occlusion_truth(ref: nn.Module, image: torch.Tensor, layer: str, channel: int, patch: int, stride: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Independent occlusion: softmax of the model's output and ``layer``'s map ``channel``
    total for each occluder position (fill 0), row-major, by the oracle's forward."""
    c, h, w = image.shape
    boxes = [(t, l) for t in range(0, h - patch + 1, stride) for l in range(0, w - patch + 1, stride)]
    imgs = image.unsqueeze(0).repeat(len(boxes), 1, 1, 1)
    for k, (t, l) in enumerate(boxes):
        imgs[k, :, t : t + patch, l : l + patch] = 0.0
    probs = torch.softmax(oracle_activation(ref, imgs, ""), dim=1)
    act = oracle_activation(ref, imgs, layer)
    return probs, act[:, channel].reshape(len(boxes), -1).sum(dim=1)


def check_occlusion(model: nn.Module, image: torch.Tensor, layer: str, channel: int, *, ref: nn.Module | None = None,
                    patch: int = 4, stride: int = 4, methods: Sequence[str] = ("incremental", "full")
                    ) -> dict[str, Outcome]:  # fmt: skip
    """``zfvis.occlusion`` by each method against the oracle's occlusion (and so each other),
    or a typed refusal; the model unchanged."""
    from zfvis import occlusion

    probs, acts = occlusion_truth(ref if ref is not None else model, image, layer, channel, patch, stride)
    out: dict[str, Outcome] = {}
    for method in methods:
        before = snapshot(model)
        what = f"occlusion(layer={layer!r}, channel={channel}, method={method!r})"
        try:
            res = occlusion(model, image, patch=patch, stride=stride, layer=layer, channel=channel, method=method)
        except ZfvisError as err:
            assert_unchanged(model, before, what)
            out[method] = Outcome("refused", str(err), err)
            continue
        except Exception as err:  # noqa: BLE001
            raise ContractViolation(f"{what}: untyped {type(err).__name__}: {err}") from err
        assert_unchanged(model, before, what)
        e_prob = (res.class_prob.reshape(-1) - probs[:, res.target]).abs().max().item()
        e_act = rel_error(res.activation.reshape(-1), acts)  # type: ignore[union-attr]
        if e_prob > 1e-9 or e_act > RTOL:
            raise ContractViolation(f"{what}: wrong answer: class probability off by {e_prob:.3g}, map totals rel "
                                    f"error {e_act:.3g} against the oracle")
        out[method] = Outcome("exact")
    return out
