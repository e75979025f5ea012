"""What a fourth sweep of models against the float64 oracle found (issue 20).

About 130 new constructs and 24 timm and torchvision families. A shape taken from the signal
and given to an op (``t.expand(a.shape)``) held the recorded batch size: a raw ``RuntimeError``
with several seeds of one image, and a false "mixes the images of the batch" with two. A NaN
the model makes and then cleans (``nan_to_num(log(a))``) was reported as a failed forward pass
asking about the input size. A custom ``torch.autograd.Function`` was called "not depending on
the images". Each model is held to the capture contract (``tests/capture_contract.py``): exact
against the oracle, or refused with a typed error; the model unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capture_contract import Query
from test_capture_cases import _images, _ready, _run
from test_capture_sweep import _Three

from zfvis import Deconvnet


class _ShapeOfSignal(_Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(F.relu(self.conv1(x)))
        g = a[:, :1]
        if self.how == "expand(a.shape)":
            g = g.expand(a.shape)
        elif self.how == "expand(a.size())":
            g = g.expand(a.size())
        else:
            g = torch.broadcast_to(g, a.shape)
        return self.conv3(F.relu(a * g))


QUERIES = [Query("conv3", 1), Query("conv3", 1, top_k=3), Query("conv3", (0, 2), top_k=2, rule="gradient"),
           Query("conv3", 1, "all", rule="guided")]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("how", ["expand(a.shape)", "expand(a.size())", "broadcast_to"])
def test_a_shape_taken_from_the_signal_follows_the_seeds(how: str, batch: int) -> None:
    """A shape whose first size is the batch (``x.shape``, found so by the check's probe) has
    the number of seeds first in the reverse pass: exact with several seeds and images."""
    model = _ready(_ShapeOfSignal(how), seed=21)
    for outcome in _run(model, _images(batch), "conv3", queries=QUERIES):
        assert outcome.status == "exact", outcome.message


class _SizeFromInts(_Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(F.relu(self.conv1(x)))
        n, c, h, w = a.shape
        if self.how == "expand":
            return self.conv3(F.relu(a * a[:, :1].expand(n, c, h, w)))
        return self.conv3(F.relu(a.as_strided((n, c, h, w), a.stride())))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("how", ["expand", "as_strided"])
def test_a_size_spelled_with_the_batch_as_a_number_is_refused_naming_it(how: str, batch: int) -> None:
    """A size taken apart into numbers, ``n`` the batch size (``t.expand(n, c, h, w)``): refused
    naming the node, with several seeds of one image (a raw ``RuntimeError`` before, or a wrong
    number of outputs) and on two images (a "forward pass failed" asking about the input size)."""
    model = _ready(_SizeFromInts(how), seed=22)
    outcomes = _run(model, _images(batch), "conv3", queries=[Query("conv3", 1, top_k=3)])
    assert [o.status for o in outcomes] == ["refused"]
    assert f"'{how}'" in outcomes[0].message and "batch size" in outcomes[0].message, outcomes[0].message


class _CleansNaN(_Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(F.relu(self.conv1(x)))  # log: NaN where negative, cleaned
        return self.conv3(F.relu(torch.nan_to_num(torch.log(a), nan=0.0, neginf=-5.0) + 1))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_nan_the_model_makes_and_cleans_is_followed(batch: int) -> None:
    """log of a map with negative values (NaN), cleaned by nan_to_num: exact, not "the forward pass
    failed ... another input size?" (the check's tolerance was computed from the NaN)."""
    model = _ready(_CleansNaN(), seed=23)
    for outcome in _run(model, _images(batch), "conv3", queries=QUERIES):
        assert outcome.status == "exact", outcome.message


class _Index(_Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(F.relu(self.conv1(x)))
        if self.how == "argmax":
            a = a * torch.gather(a, 1, a.argmax(1, keepdim=True))
        elif self.how == "argsort":
            a = torch.take_along_dim(a, a.argsort(dim=1), dim=1)
        elif self.how == "pool_index":  # the switches of a max pool, as a gate
            pooled, where = F.max_pool2d(a, 2, return_indices=True)
            a = pooled * (where % 2).to(a.dtype)
        else:  # a rounding the model detached: a gate, nothing goes back through it
            a = torch.round(a * 4).detach() * a
        return self.conv3(F.relu(a))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("how", ["argmax", "argsort", "pool_index", "round_detached"])
def test_an_index_computed_from_the_signal_carries_none(how: str, batch: int) -> None:
    """An argmax, an argsort or a max pool's switches are integers, and a detached rounding has
    no gradient: their true backward sends nothing back, and the signal goes on through what they
    index or gate (refused before as "an index" or "rounding": the integers on an engine's first
    call, before the check that finds them; the rounding as if the signal went back through it)."""
    model = _ready(_Index(how), seed=24)
    Deconvnet(model).project(_images(batch), "conv3", 1)  # a fresh engine's first call (refused before)
    for outcome in _run(model, _images(batch), "conv3", queries=QUERIES):
        assert outcome.status == "exact", outcome.message


class _XTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.tanh(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        t = torch.tanh(x)
        return g * (t + x * (1 - t * t))


class _Custom(_Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(F.relu(self.conv1(x)))
        if self.how == "function":
            a = _XTanh.apply(a)
        else:  # its derivative is not implemented in PyTorch
            a = torch.heaviside(a, torch.tensor(0.5, dtype=a.dtype)) * a
        return self.conv3(F.relu(a))


@pytest.mark.parametrize(("how", "words"), [("function", "torch.autograd.Function '_XTanh'"),
                                            ("heaviside", "derivative for aten::heaviside is not implemented")])
def test_a_backward_zfvis_cannot_follow_is_refused_naming_it(how: str, words: str) -> None:
    """A custom ``torch.autograd.Function`` (it was called "not depending on the images", and its
    layer left out of ``layer_names()``), and an op PyTorch has no derivative for (a raw
    ``RuntimeError``): refused, naming them; the layers before them still project."""
    model = _ready(_Custom(how), seed=25)
    outcomes = _run(model, _images(1), "conv3", queries=[Query("conv3", 1), Query("conv3", 1, rule="gradient")])
    for outcome in outcomes:
        assert outcome.status == "refused" and words in outcome.message, outcome.message
    assert "conv3" in Deconvnet(model).layer_names()
    assert [o.status for o in _run(model, _images(1), "conv2", queries=[Query("conv2", 1)])] == ["exact"]


class _Numbers(_Three):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(F.relu(self.conv1(x)))
        if self.how == "scale":
            a = a * (torch.arange(6).view(1, 6, 1, 1) * 0.1 + 0.5)
        else:
            a = torch.index_select(a, 1, torch.arange(6) * 5 % 6)
        return self.conv3(F.relu(a))


@pytest.mark.parametrize("how", ["scale", "index"])
def test_a_constant_computed_from_numbers_in_forward_is_exact(how: str) -> None:
    """``torch.arange(6) * 0.1 + 0.5``, which the trace computes once: the same constant in both
    runs (it was a capture mismatch blaming a hook or an in-place write)."""
    model = _ready(_Numbers(how), seed=26)
    for outcome in _run(model, _images(2), "conv3", queries=QUERIES):
        assert outcome.status == "exact", outcome.message


class _Counter(_Three):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


def test_a_forward_writing_its_buffer_is_refused_naming_the_buffer() -> None:
    model = _ready(_Counter(), seed=27)
    for outcome in _run(model, _images(1), "conv3", queries=[Query("conv3", 1)]):
        assert outcome.status == "refused" and "writes into its buffer 'calls'" in outcome.message, outcome.message
    assert int(model.calls) == 0
