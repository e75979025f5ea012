"""Property test of the capture (issue 20): random small CNNs from a grammar
(``tests/model_grammar.py``), each projected under every rule from a few of its layers and
held to the contract of ``tests/capture_contract.py``: equal to the float64 oracle (run on
the model's out-of-place twin) or a typed refusal, the model unchanged; and incremental
occlusion equal to the full method and to the oracle's occlusion, or refused.

``ZFVIS_GRAMMAR_N`` models (default 80, about 15 s on an idle 2-core machine); ``ZFVIS_SLOW=1``
adds 300 more. A failure prints the model's program (``GenModel.describe()``) and its seed:
``generate(seed)`` rebuilds it.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from capture_contract import ContractViolation, Query, assert_unchanged, check_occlusion, check_projection, snapshot
from model_grammar import GenModel, generate
from oracle import RULES, oracle_activation

from zfvis import Deconvnet
from zfvis.io.errors import ZfvisError

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny float64 tensors on a busy machine

N = int(os.environ.get("ZFVIS_GRAMMAR_N", "80"))
SLOW = 300 if os.environ.get("ZFVIS_SLOW") else 0
SEEDS = list(range(N + SLOW))


def _queries(model: GenModel, ref: GenModel, x: torch.Tensor, rng: random.Random) -> list[Query]:
    """Up to three layers (the deepest map, one other, the output), each rule, one kind of
    seed each (the strongest, a position, the top k, the whole map, two channels)."""
    maps = model.layers[:-1]
    layers = ([maps[-1]] if maps else []) + ([rng.choice(maps[:-1])] if len(maps) > 1 else []) + ["head"]
    out = []
    for layer in layers:
        act = oracle_activation(ref, x[:1], layer)[0]
        for rule in RULES:
            c = rng.randrange(act.shape[0])
            if act.dim() != 3:
                out.append(Query(layer, c if rng.random() < 0.7 else (c, (c + 1) % act.shape[0]), rule=rule))
                continue
            kind = rng.choice(["strongest", "position", "top_k", "all", "channels"])
            h, w = act.shape[1:]
            if kind == "position":
                out.append(Query(layer, c, (rng.randrange(h), rng.randrange(w)), rule=rule))
            elif kind == "top_k":
                out.append(Query(layer, c, top_k=min(3, h * w), rule=rule))
            elif kind == "all":
                out.append(Query(layer, c, "all", rule=rule))
            elif kind == "channels":
                out.append(Query(layer, (c, (c + 1) % act.shape[0]), rule=rule))
            else:
                out.append(Query(layer, c, rule=rule))
    return out


def _check_model(seed: int) -> tuple[list[str], dict[str, int]]:
    """Every query of model ``seed``: the violations found, and how the calls ended."""
    model = generate(seed)
    ref = model.out_of_place_twin()
    rng = random.Random(seed)
    x = torch.randn(rng.choice([1, 2]), 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    problems: list[str] = []
    counts = {"exact": 0, "refused": 0}
    before = snapshot(model)
    try:
        dn = Deconvnet(model)
    except ZfvisError:
        assert_unchanged(model, before, "Deconvnet(model)")
        return problems, {"exact": 0, "refused": 1}
    except Exception as err:  # noqa: BLE001 - the contract: a typed error or nothing
        return [f"Deconvnet(model): untyped {type(err).__name__}: {err}"], counts
    for q in _queries(model, ref, x, rng):
        try:
            counts[check_projection(dn, model, x, q, ref=ref).status] += 1
        except ContractViolation as err:
            problems.append(str(err))
    maps = model.layers[:-1]
    if maps:
        layer = maps[-1]
        channel = rng.randrange(oracle_activation(ref, x[:1], layer).shape[1])
        try:
            for outcome in check_occlusion(model, x[0], layer, channel, ref=ref).values():
                counts[outcome.status] += 1
        except ContractViolation as err:
            problems.append(str(err))
    return problems, counts


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_model_meets_the_contract(seed: int) -> None:
    problems, _ = _check_model(seed)
    if problems:
        model = generate(seed)
        listed = "\n  - ".join(problems[:8])
        more = f"\n  (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        text = f"seed {seed}: {len(problems)} violation(s):\n  - {listed}{more}\n{model.describe()}"
        pytest.fail(text, pytrace=False)


def test_the_grammar_covers_what_it_promises() -> None:
    """The models checked above hold every construct the grammar names (so a passing run
    means something), and each one's twin computes the model's own function."""
    kinds: set[str] = set()
    hooks: set[str] = set()
    train = 0
    for seed in SEEDS:
        model = generate(seed)
        kinds |= {op.kind for op in model.program}
        for m in model.modules():
            hooks |= {type(h).__name__ for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())}
        train += model.training
        if seed < 40:
            x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
            twin = model.out_of_place_twin().eval()
            with torch.no_grad():
                want = model.eval()(x.clone())  # (a fresh model: its mode need not be restored)
            assert torch.allclose(twin(x.clone()), want, rtol=1e-12, atol=1e-12), model.describe()
    need = {"module", "fconv", "fpool", "fact", "fact_", "mask", "add", "mul", "iadd", "iadd3", "iadd_const",
            "setitem", "alias", "cat", "split", "chunk", "const", "opaque", "transpose", "permute_linear", "slice_w",
            "shape_write"}
    if len(SEEDS) >= 60:
        assert need <= kinds, sorted(need - kinds)
        assert {"ScaleHook", "FlipHook", "PreScaleHook"} <= hooks, hooks
        assert train > 0
