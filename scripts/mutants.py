"""Mutation check: do the tests notice when the op table or an engine computes something else?

Each mutant (the table :data:`MUTANTS`) replaces one short snippet of a file of the package
with a plausible mistake: a sign, an off-by-one, a rule's formula, a refusal dropped. For
every mutant the script copies the repository (its tracked files and the untracked ones git
does not ignore) to a temporary directory, applies the replacement there, and runs the
tests that should notice, with the same interpreter, in that copy (so the copy's ``zfvis``
is imported):

    python -m pytest -x -q -p no:cacheprovider <the mutant's tests>

A mutant is *killed* when those tests fail, *survived* when they pass, *stale* when its
snippet is not found exactly once (the code moved: update the table), *timeout* when the
run exceeds ``--timeout``, *error* when pytest could not run the tests (none collected, a
usage error). The exit status is 1 when any mutant not marked equivalent survived, or any
mutant is stale, timed out or errored. The working tree is never modified.

    python scripts/mutants.py                 # every mutant (about 6 minutes on 2 cores)
    python scripts/mutants.py --list          # the table
    python scripts/mutants.py --only sub-sign,div-reciprocal [--timeout 300]
"""


import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from zfvis.io.progress import progress

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One mutation of the package.

    Attributes:
        id: A short name (for ``--only``).
        file: The file it changes, relative to the repository's root.
        original: The exact snippet it replaces (it must occur exactly once in the file).
        replacement: What replaces it.
        why: What the mutation breaks, and why that matters.
        tests: The pytest arguments (files, ``-k`` selections) whose run should kill it.
        equivalent: Whether it computes the same results (it cannot be killed by a test
            of results; ``why`` says why); its survival does not fail the check.
    """

    id: str
    file: str
    original: str
    replacement: str
    why: str
    tests: tuple[str, ...]
    equivalent: bool = False


# files
_OPS = "zfvis/core/ops/__init__.py"
_BUILD = "zfvis/core/ops/build.py"
_CHECKS = "zfvis/core/ops/checks.py"
_GRAD = "zfvis/core/ops/grad.py"
_REV = "zfvis/core/reverse.py"
_REVG = "zfvis/core/reverse_grad.py"
_RCONV = "zfvis/core/reverse_conv.py"
_REC = "zfvis/core/record.py"
_INPL = "zfvis/core/inplace.py"
_CONE = "zfvis/core/cone.py"
_WIN = "zfvis/core/windows.py"
_OCC = "zfvis/core/ops/incremental_rules.py"
_GEO = "zfvis/core/geometry.py"
_CAP = "zfvis/core/capture.py"
_GRAPH = "zfvis/core/graph.py"
_PROG = "zfvis/core/program.py"

# test selections
_CNN = "tests/test_every_cnn.py"
_CAPT = "tests/test_capture.py"
_SEM = "tests/test_op_semantics.py"


def _arith(*cases: str) -> tuple[str, ...]:
    """``test_every_cnn``'s arithmetic oracle checks of the given cases."""
    return (_CNN, "-k", f"arithmetic and ({' or '.join(cases)})")


def _act(*names: str) -> tuple[str, ...]:
    """``test_every_cnn``'s activation checks (every rule against the oracle) of the given names."""
    return (_CNN, "-k", f"every_activation and ({' or '.join(names)})")


_WINDOWED = ("tests/test_engine.py", "-k", "windowed_equals_dense")
_OCCLUSION = ("tests/test_occlusion.py", "-k", "chain_equals_brute_force or residual_equals_brute_force")

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ the op table: arithmetic
    Mutant("sub-sign", _BUILD, 'sign = -1.0 if target_name', 'sign = 1.0 if target_name',
           "a - b sends +signal to b: the subtrahend's projection flips sign", _arith("sub")),
    Mutant("sub-alpha", _BUILD, "1.0 if pos == 0 else sign * alpha", "1.0 if pos == 0 else sign",
           "torch.add/sub(a, b, alpha=k): b's signal must be scaled by alpha", (_SEM, "-k", "alpha")),
    Mutant("div-reciprocal", _BUILD, "Multiply(1.0 / other if division", "Multiply(other if division",
           "x / c reversed as multiplication by c instead of 1/c", _arith("div")),
    Mutant("neg-sign", _CHECKS, 'return site.arg(0, "input"), -1.0', 'return site.arg(0, "input"), 1.0',
           "-x reversed as +x", (_SEM, "-k", "neg")),
    Mutant("row-broadcast-windowed", _CHECKS, "return v.numel() == 1 or (",
           "return v.dim() == 1 or v.numel() == 1 or (",
           "a (W,) factor taken as the same at every (y, x): windows scaled by the wrong columns", _arith("row")),
    Mutant("broadcast-add-windowed", _CHECKS, 'site.cone = "same" if all(s == site.out_shape for s in site.in_shapes)'
           ' else "full"\n\n\n#', 'site.cone = "same" if any(s == site.out_shape for s in site.in_shapes)'
           ' else "full"\n\n\n#',
           "x + x.mean(keepdim) reversed on windows although one operand is broadcast", _arith("broadcast_add")),
    Mutant("product-one-branch", _REVG, "for pos, k in enumerate(self.ks):", "for pos, k in enumerate(self.ks[:1]):",
           "the product rule of x * gate(x) drops the gate's branch",
           (_CNN, "tests/test_graph.py", "-k", "(arithmetic and gate) or gate_and_product")),
    Mutant("cat-split-order", _BUILD, "[dim - 1] for t in tensors]", "[dim - 1] for t in tensors][::-1]",
           "cat's signal split at the wrong offsets (the sizes in reverse order)",
           (_SEM, "-k", "cat_channels or cat_width")),
    Mutant("getitem-windowed", _CHECKS, "len(explicit) > in_dims - 2", "len(explicit) > in_dims - 1",
           "slicing the map's rows (x[:, :, 1:]) reversed on windows: the slice lands at the wrong place",
           (_SEM, "-k", "getitem")),
    # ------------------------------------------------------------------ the op table: rectifiers and gates
    Mutant("relu6-cut", _BUILD, 'return out < 6 if rule == "deconvnet"', 'return out <= 6 if rule == "deconvnet"',
           "ReLU6 passes signal where its input was >= 6 (deconvnet rule)",
           (_CNN, "-k", "relu6_saturation")),
    Mutant("relu6-cut-guided", _BUILD, "else (out > 0) & (out < 6)", "else (out > 0)",
           "ReLU6 passes signal where its input was >= 6 (guided and gradient rules)",
           (_CNN, "-k", "relu6_saturation")),
    Mutant("hardtanh-defaults", _CHECKS, 'site.arg(1, "min_val", -1.0), site.arg(2, "max_val", 1.0)',
           'site.arg(1, "min_val", 0.0), site.arg(2, "max_val", 6.0)',
           "F.hardtanh(x)'s default limits (-1, 1) taken as ReLU6's. EQUIVALENT: torch.fx records a "
           "torch.nn.functional call with every parameter filled in as a keyword (min_val=-1.0, max_val=1.0), "
           "so these defaults are never read", (_SEM, "-k", "hardtanh"), equivalent=True),
    Mutant("hardtanh-cap-unchecked", _CHECKS, "if (float(lo), float(hi)) != (0.0, 6.0):", "if float(lo) != 0.0:",
           "hardtanh(0, 1) (a ReLU capped at 1) accepted and reversed as ReLU6", (_SEM, "-k", "hardtanh")),
    Mutant("relu-mask-nonnegative", _BUILD, 'else out > 0', 'else out >= 0',
           "the guided/gradient ReLU mask passes where the input was negative (out == 0)", _act("ReLU")),
    Mutant("guided-not-rectified", _REV, 'if self.by_rule and frame.rule != "gradient":',
           'if self.by_rule and frame.rule == "deconvnet":',
           "the guided rule forgets to rectify the signal: f'(x) g instead of f'(x) relu(g)", _act("GELU", "Mish")),
    Mutant("gate-rectified", _REV, 'if self.by_rule and frame.rule != "gradient":', 'if frame.rule != "gradient":',
           "sigmoid/tanh gates rectified by the rule although they keep their true backward",
           _act("Sigmoid", "Tanh")),
    Mutant("gradient-rectified", _REV, 'if self.by_rule and frame.rule != "gradient":', "if self.by_rule:",
           "the gradient rule rectifies the signal too: f'(x) relu(g) instead of f'(x) g", _act("GELU", "Mish")),
    Mutant("deconvnet-rectifier-masked", _GRAD, 'return None if rule == "deconvnet" else derivative',
           "return derivative", "the deconvnet rule multiplies by f'(x) too, as guided does", _act("SiLU", "ELU")),
    Mutant("lrn-true-backward", _OPS, 'nn.LocalResponseNorm: "identity"', 'nn.LocalResponseNorm: "vjp"',
           "LocalResponseNorm reversed by the generic vector-Jacobian product instead of passed through. "
           "EQUIVALENT: the generic layer runs under RuleMode (core/rule_mode.py), which gives "
           "F.local_response_norm the identity backward too, so the result is the same",
           ("tests/test_engine.py", "-k", "projection_matches_oracle and odd-features.7"), equivalent=True),
    Mutant("rectifier-slope-at-output", _GRAD, "else derivative(_one_input(site), inputs[0])",
           "else derivative(_one_input(site), out)",
           "a rectifier's f' taken at its output f(x) instead of its input x", _act("SiLU", "GELU")),
    Mutant("gate-derivative-one", _GRAD, "return derivative(_one_input(site), inputs[0])",
           "return torch.ones_like(inputs[0])", "a gate passes the signal unchanged instead of f'(x) g",
           _act("Sigmoid", "Tanh")),
    # ------------------------------------------------------------------ the op table: linear layers
    Mutant("bn-eps-dropped", "zfvis/core/reverse_conv.py", "scale = torch.rsqrt(var + eps)", "scale = torch.rsqrt(var)",
           "BatchNorm2d's reverse scale without eps (1e-3 in MobileNetV3: off by 0.05 %)",
           (_CNN, "-k", "families and mobilenet_v3_small")),
    Mutant("bn-function-eps", _BUILD, 'site.arg(7, "eps", 1e-5)', 'site.arg(7, "momentum", 1e-5)',
           "F.batch_norm's reverse scale takes its momentum for eps", (_SEM, "-k", "batch_norm")),
    Mutant("conv-bias-applied", _RCONV, "F.conv_transpose2d(signal, weight, None, conv.stride,",
           "F.conv_transpose2d(signal, weight, torch.ones(weight.shape[1] * conv.groups, dtype=signal.dtype), "
           "conv.stride,", "the reverse convolution adds a bias (Zeiler & Fergus apply none)",
           _arith("mul_kw")),
    Mutant("conv-pre-pad-sign", _RCONV, "Axis(conv.kernel_size[0], conv.stride[0], pre_pad[0],",
           "Axis(conv.kernel_size[0], conv.stride[0], -pre_pad[0],",
           "the reverse convolution's windows shifted by twice the padding", _WINDOWED),
    Mutant("unpool-overwrites", _REV, "out.scatter_add_(2,", "out.scatter_(2,",
           "overlapping pooling windows: switches at one location overwrite instead of adding up",
           ("tests/test_batching.py", "-k", "dilated_and_overlapping")),
    Mutant("unpool-window-offset", _REV, "local = idx - offset if lx == width", "local = idx if lx == width",
           "unpooling on a window ignores where the window starts (switches land off the window)",
           (_SEM, "-k", "unpooling")),
    # ------------------------------------------------------------------ refusals
    Mutant("dropout-default-training", _CHECKS, '"training", True) is not False',
           '"training", False) is not False',
           "F.dropout(x, p)'s default training taken as False. EQUIVALENT: torch.fx records the call with "
           "training=True as a keyword, so this default is never read",
           ("tests/test_engine.py", "-k", "unsupported_operations and dropout"), equivalent=True),
    Mutant("dropout-training-accepted", _CHECKS, '"training", True) is not False', '"training", True) is None',
           "F.dropout(x, p) (training=True by default) accepted: random in eval mode",
           ("tests/test_engine.py", "-k", "unsupported_operations and dropout")),
    Mutant("floordiv-accepted", _OPS, "torch.floor_divide, operator.floordiv,", "torch.floor_divide,",
           "x // 2 no longer in the refused table", (_SEM, "-k", "floordiv")),
    Mutant("batch-merge-accepted", "zfvis/core/stretches.py",
           "return out.dim() == 0 or out.shape[0] != self.batch or node.name in",
           "return False and node.name in",
           "an output that merges the batch dimension is reversed per image as if the batch were first",
           ("tests/test_engine.py", "-k", "unsupported_operations and (flatten_all or view_merge)")),
    # ------------------------------------------------------------------ in place
    Mutant("inplace-alias-by-address", _INPL, "value is not target and storage(value) == ptr",
           "value is not target and value.data_ptr() == target.data_ptr()",
           "the alias check compares where the tensors start, not their storage: a view at an offset escapes",
           (_SEM, "-k", "in_place")),
    Mutant("inplace-method-not-new-version", _INPL, 'return name.endswith("_") and not name.startswith("__")',
           "return False", "t.relu_() is not a new version of t: later readers read the value before the call",
           (_CNN, "-k", "in_place_statement")),
    Mutant("inplace-augmented-ignored", _CAP, "if a.in_place and not b.in_place and b.node is not None:",
           "if False:", "a += b (traced as a + b) is not a new version of a",
           (_CAPT, "-k", "source_text")),
    # ------------------------------------------------------------------ capture
    Mutant("capture-hooks-ignored", _GRAPH, "n.hooked = n.carries and n.module_name in modules",
           "n.hooked = False and n.carries and n.module_name in modules",
           "a hooked leaf reversed by its op's own layer, as if the hook did nothing",
           (_CAPT, "-k", "hook_is_part")),
    Mutant("capture-undeclared-write-allowed", _CAP, "if declared and writer is not None:",
           "if declared and writer is not None and False:",
           "a tensor overwritten in place by a node the graph does not show blamed on its reader. EQUIVALENT: "
           "the check at the start of each node (_check_versions) finds the same overwrite first and names the "
           "writer", (_CAPT, "-k", "untraceable_write"), equivalent=True),
    Mutant("capture-read-version-ignored", _CAP, "if any(name in self.declared and w == wrote for",
           "if any(name in self.declared or w == wrote for",
           "a value kept between calls (not passed by the graph) passes the check",
           (_CAPT, "-k", "kept_between")),
    Mutant("capture-masks-carry", _CAP, "if run.constant:", "if False:",
           "a mask (x > 0) carries the signal and is refused as having no gradient",
           (_CAPT, "-k", "masks")),
    Mutant("capture-calls-unchecked", _CAP, "if a.op != b.op or (a.in_place != b.in_place and not twin)",
           "if a.op != b.op and (a.in_place != b.in_place and not twin)",
           "calls that differ in op between the model and the graph pass the check. EQUIVALENT: a call that "
           "differs in op also differs in what it reads or in what later calls read (the index of its maker), so "
           "the comparison of reads finds it at the same call or the next", (_CAPT, "-k", "kept_between"),
           equivalent=True),
    Mutant("whole-batch-seed-image", _REVG, "seed[i] = signal[j].to(out.dtype)", "seed[0] = signal[j].to(out.dtype)",
           "a seed's signal sent back from the first image of a folded stretch",
           (_CAPT, "-k", "folded and 3")),
    Mutant("whole-batch-mixing-allowed", _REVG, "if grad.shape[0] == 1:", "if True:",
           "a stretch that mixes images is reversed per image without a word",
           (_CAPT, "-k", "mixes")),
    Mutant("batch-probe-ignored", _CAP, "more.get(name, n + 1) != n + 1", "False",
           "an axis as long as the batch taken for the batch (qkv permuted before it)",
           (_CAPT, "-k", "SharedQKV and 3")),
    Mutant("pointwise-constant-map-windowed", _GRAD, "and not _varies_over_map(site)", "",
           "clamp(t, min=map) cut into windows without cutting the map",
           (_CAPT, "-k", "constant_map")),
    Mutant("vjp-train-mode", "zfvis/core/ops/args.py", "            with _eval(module):",
           "            with contextlib.nullcontext():",
           "a PyTorch leaf without an entry (MultiheadAttention) reversed in training mode (its dropout on)",
           ("tests/test_capture_cases.py", "-k", "train and pytorch_leaf")),
    Mutant("program-rule-ignored", _PROG, "if tr.paused or not follows_rule(func, args, kwargs):", "if True:",
           "rectifiers inside replayed code (an untraceable submodule) sent back by their true backward, not the rule",
           ("tests/test_program.py", "-k", "as_it_ran and deconvnet")),
    Mutant("program-random-allowed", _PROG, "if self.problem is None and _random(func, args, kwargs):",
           "if False:", "a submodule that draws random numbers in eval mode replayed (with other numbers)",
           ("tests/test_program.py", "-k", "does_not_replay")),
    Mutant("program-replay-unchecked", _PROG, "if check and tracker.problem is None and not _same(",
           "if False and not _same(", "a submodule whose replay gives other values reversed. EQUIVALENT: what makes "
           "a replay differ (random calls, writes into tensors kept between calls) is refused first when recorded; "
           "the replay against the output, once per input key, is a second line",
           ("tests/test_program.py", "-k", "does_not_replay"), equivalent=True),
    Mutant("program-saved-copies-off", _PROG, "with _saved_copies() if self.writes else",
           "with contextlib.nullcontext() if self.writes else",
           "replayed code that writes in place into a tensor autograd saved (an untraceable in-place write)",
           ("tests/test_capture_property.py", "-k", "contract and 33")),
    Mutant("no-grad-carries", _GRAPH, "if gn in no_grad or _detaches(gn.fx_node) or not any(",
           "if not any(", "a value made under torch.no_grad() (or detached) reversed as if gradients flowed through it",
           ("tests/test_capture_sweep.py", "-k", "sends_nothing_back")),
    Mutant("hidden-rectifier-allowed", _CAP, 'self.hidden_rectifiers.items() if rule != "gradient" else ()',
           '()', "a TorchScript or aten-level ReLU passed back by its gradient under the "
           "deconvnet rule", ("tests/test_capture_sweep.py", "-k", "no_torch_call_shows")),
    Mutant("backward-hooks-ignored", _CAP, "        if self.backward_hooks is not None:\n",
           "        if False:\n", "a model with backward hooks projected without them (the gradient the hooks change)",
           ("tests/test_capture_sweep.py", "-k", "backward_hooks")),
    Mutant("trace-constant-on-model", _GRAPH, "if type(a) is torch.Tensor and self.tensor_attrs.get(a) is None:",
           "if False:", "a tensor the trace makes (torch.arange in forward) set on the model as an attribute",
           ("tests/test_capture_sweep.py", "-k", "numbers")),
    Mutant("factory-recorded", "zfvis/core/recorder.py",
           "if not random and all(_from_numbers(r) for r in reads):", "if False:",
           "a tensor made from numbers in forward, which the trace made once, taken for a mismatch (a false refusal)",
           ("tests/test_capture_sweep.py", "-k", "numbers")),
    Mutant("buffers-not-restored", "zfvis/core/model_state.py", "if buf._version != version:", "if False:",
           "a forward that writes its own buffer (a call counter) left changed by zfvis's runs",
           ("tests/test_capture_sweep.py", "-k", "own_buffer")),
    Mutant("graph-run-without-rule", _PROG, "with torch.enable_grad(), RuleMode(self.rule):\n            out = call_on",
           "with torch.enable_grad():\n            out = call_on",
           "an untraceable submodule's later runs kept with their plain gradient, not the rule's",
           ("tests/test_program.py", "-k", "graph_of_the_run")),
    Mutant("graph-leaves-shared", _PROG, "leaves = [t.detach().clone().requires_grad_(True) for t in live]",
           "leaves = [t.detach().requires_grad_(True) for t in live]",
           "the kept graph's leaves sharing memory with the forward pass's values",
           ("tests/test_program.py", "-k", "graph_of_the_run")),
    Mutant("transpose-not-swapped-back", "zfvis/core/reverse_shape.py", "return [signal.transpose(*self.dims)]",
           "return [signal.reshape(signal.shape[0], *frame.in_shapes[0][:-2], *signal.shape[-2:])]",
           "a channel shuffle's transpose reversed by reshaping the signal, not swapping the dimensions back",
           ("tests/test_op_semantics.py", "-k", "transpose")),
    Mutant("transpose-any-on-windows", "zfvis/core/ops/transpose.py", "all(1 <= d <= n - 3 for d in dims)",
           "all(1 <= d <= n - 1 for d in dims)", "a transpose that moves a map dimension reversed on windows",
           ("tests/test_op_semantics.py", "-k", "transpose")),
    Mutant("ancestors-kept-after-rewiring", _INPL, "    graph._ancestors.clear()  # the edges change\n", "",
           "the nodes a target depends on kept from before the check found in-place writes and rewired the graph",
           ("tests/test_capture.py", "-k", "in_place_writes_come")),
    Mutant("padding-mode-as-zeros", "zfvis/core/ops/checks.py", 'site.hand_to = "vjp"', "pass",
           "a convolution padding by reflection reversed as if it padded with zeros",
           ("tests/test_every_cnn.py", "-k", "padding_by_other_modes")),
    Mutant("union-one-unclamped", _CONE, "start_y, start_x = max(0, min(top, map_size[0] - h)), ",
           "start_y, start_x = max(0, top), ", "one seed's union of windows not kept inside the map",
           ("tests/test_reverse_speed_paths.py", "-k", "unions")),
    Mutant("training-not-in-verdict", _CAP, "training=any(m.training for m in model.modules()))", "training=False)",
           "a model in train() projected with its training-mode forward (eval mode not set)",
           ("tests/test_capture.py", "tests/test_capture_sweep.py", "tests/test_capture_cases.py")),
    Mutant("written-constant-not-versioned", _INPL, "again = _new_version(gn, of, into_constant=True) or again",
           "again = _new_version(gn, of) or again", "the signal written into a tensor made from a shape not followed",
           ("tests/test_capture_sweep.py", "-k", "made_from_a_shape")),
    Mutant("written-constant-shared", "zfvis/core/ops/args.py", "args = (args[0].clone(), *args[1:])", "pass",
           "an in-place call's reverse writing into the recorded tensor itself, again at each call",
           ("tests/test_capture_sweep.py", "-k", "made_from_a_shape")),
    Mutant("written-constant-after-the-write", _REC, "before = _written_constant(node, env)", "before = None",
           "the tensor written into recorded as it was after the call, not before",
           ("tests/test_capture_sweep.py", "-k", "made_from_a_shape")),
    Mutant("factor-not-per-seed", _REV, "            factor = factor[frame.image]  # one per recorded image",
           "            pass  # one per recorded image",
           "a constant factor with one item per image multiplied into every seed's signal whole",
           ("tests/test_capture_sweep.py", "-k", "factor_made_from_a_shape")),
    Mutant("factory-memory-kept", "zfvis/core/recorder.py",
           "                    self.wrote.pop(storage(t), None)  # new memory: what a freed tensor there had is gone\n",
           "", "a tensor a factory made read as written by the call that wrote a freed tensor at its address",
           ("tests/test_capture_sweep.py", "-k", "factory_made")),
    Mutant("linear-map-constant-whole", _REV, "out = self._fn(z, frame.image) if self.cone != \"same\" else self._fn(z)",
           "out = self._fn(z)", "a linear map's constant argument with the batch given whole to every seed",
           ("tests/test_capture_sweep.py", "-k", "constant_argument_with_the_batch")),
    Mutant("vjp-constant-whole", _REVG, "fn = functools.partial(self._fn, image=frame.image) if self.per_image else self._fn",
           "fn = self._fn", "a vector-Jacobian product's constant argument with the batch given whole to every seed",
           ("tests/test_capture_sweep.py", "-k", "constant_argument_with_the_batch")),
    Mutant("check-constant-whole", _GRAD, "    if per_image:  # its other tensor arguments", "    if False:  # its other tensor arguments",
           "the gradient check's one image run with constants of the whole batch",
           ("tests/test_capture_sweep.py", "-k", "constant_argument_with_the_batch")),
    Mutant("vjp-seed-batch-unchecked", _REVG, "if not isinstance(out, torch.Tensor) or out.shape[:1] != signal.shape[:1]:",
           "if False:", "a node whose output ignores the number of seeds (as_strided) reversed anyway",
           ("tests/test_capture_fourth_sweep.py", "-k", "spelled_with_the_batch")),
    Mutant("check-failure-as-forward-failure", _GRAD, "        except RuntimeError as err:  # it ran on the batch",
           "        except ZeroDivisionError as err:  # it ran on the batch",
           "a node that fails on one image reported as the forward pass failing on the input's size",
           ("tests/test_capture_fourth_sweep.py", "-k", "spelled_with_the_batch")),
    Mutant("ledger-replacement-refused", "zfvis/io/ownership.py", "            raise _Replaced\n",
           "            raise _refuse(path, \"changed while it was read\")\n",
           "a ledger another zfvis process renamed over the old one while it was read refused, not read again",
           ("tests/test_ledger_safety.py", "-k", "replaces_while")),
    Mutant("every-constant-per-seed", _REC, "if not p.carries and p.name in self.batch_first and p.fx_node in env)",
           "if not p.carries and p.fx_node in env)", "a weight argument taken per seed as if it had the batch first",
           ("tests/test_capture_sweep.py", "-k", "weight_argument")),
    Mutant("no-constant-per-seed", _REC, "if not p.carries and p.name in self.batch_first and p.fx_node in env)",
           "if False)", "a constant argument with the batch given whole to every seed",
           ("tests/test_capture_sweep.py", "-k", "constant_argument_with_the_batch")),
    # ------------------------------------------------------------------ recording
    Mutant("record-inputs-not-copied", _REC, "inputs = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]",
           "inputs = list(inputs)", "an in-place rectifier's f' taken at the overwritten input (its output)",
           _act("inplace")),
    Mutant("record-output-not-copied", _REC, "out if i == last else out.clone()", "out",
           "a recorded activation later overwritten in place (ResNet's ReLU(inplace=True)) is returned changed",
           (_CNN, "-k", "forward_hooks")),
    # ------------------------------------------------------------------ cones and windows
    Mutant("cone-reached-last", _GEO, ".amax(dim=(1, 2)) + 1", ".amax(dim=(1, 2))",
           "a dilated layer's cone misses its last row and column (_reached off by one)",
           ("tests/test_batching.py", "-k", "dilated_and_overlapping")),
    Mutant("cone-extent", _GEO, "return self.d * (self.k - 1) + 1", "return self.d * (self.k - 1)",
           "a layer's cone one row and column short", _WINDOWED),
    Mutant("crop-loop-edge", _WIN, "min(t + height, h), max(l_, 0)", "min(t + height, h - 1), max(l_, 0)",
           "a window reaching the map's last row drops it", _WINDOWED),
    Mutant("move-direction", _WIN, "None, dst.top - src.top, dst.left - src.left",
           "None, src.top - dst.top, src.left - dst.left",
           "a signal moved between windows in the wrong direction (where a value's window holds several "
           "readers' cones: a residual block)", (_SEM, "-k", "residual")),
    # ------------------------------------------------------------------ occlusion's incremental rules
    Mutant("occ-changed-hi", _GEO, 'rounding_mode="floor") + 1', 'rounding_mode="floor")',
           "Window.changed one output row short at the bottom: a changed output is taken from the cache",
           _OCCLUSION),
    Mutant("occ-changed-lo-ceil", _GEO, "lo = -torch.div(", "lo = 1 - torch.div(",
           "Window.changed one output row short at the top", _OCCLUSION),
    Mutant("occ-changed-lo-floor", _GEO, "lo = -torch.div(-(a + self.p - self.d * (self.k - 1)), self.s,",
           "lo = torch.div((a + self.p - self.d * (self.k - 1)), self.s,",
           "Window.changed rounds down instead of up: one row too many recomputed (results equal, work not)",
           (_SEM, "-k", "strided_cone")),
    Mutant("occ-reads-offset", _GEO, "return a * self.s - self.p, (b - 1)", "return a * self.s + self.p, (b - 1)",
           "a window's input read at the wrong offset (padding added instead of subtracted)", _OCCLUSION),
    Mutant("occ-avgpool-include-pad", _OCC, "if not include_pad:", "if include_pad:",
           "average pooling's divisor ignores count_include_pad", _OCCLUSION),
    Mutant("occ-conv-bias-dropped", _OCC, "F.conv2d(x, weight, bias, stride, 0", "F.conv2d(x, weight, None, stride, 0",
           "a recomputed convolution window without its bias", _OCCLUSION),
    Mutant("occ-rule-whole-maps", _OCC, 'if site.cone == "same":', 'if site.cone in ("same", "full"):',
           "an op that reads whole maps (GroupNorm) computed on windows as if it acted per position",
           ("tests/test_op_table.py", "-k", "whole_maps")),
    Mutant("gradient-check-cached-for-batches", _REC, "once = self.batch == 1 and", "once = True and",
           "the per-image gradient check skipped after the first pass of several images, where values could hide mixing",
           (_CAPT, "-k", "gradient_check")),
    Mutant("gradient-check-cached-for-random", _REC, "and node.name not in self.random", "",
           "a node that ran a random call taken as checked once for all (its check passing by chance)",
           (_CAPT, "-k", "random_call")),
    Mutant("bn-scale-version-ignored", "zfvis/core/reverse_conv.py", "key = (dtype, bn.eps, var._version,",
           "key = (dtype, bn.eps, 0,", "a folded BatchNorm's scale kept after its running variance was written in place",
           ("tests/test_reverse_speed_paths.py", "-k", "followed_after")),
    Mutant("bn-scale-memory-ignored", "zfvis/core/reverse_conv.py", "var._version, var.data_ptr(),",
           "var._version, 0,", "a folded BatchNorm's scale kept after its variance's memory was swapped (.data =)",
           ("tests/test_reverse_speed_paths.py", "-k", "followed_after")),
    Mutant("move-numbers-reversed", "zfvis/core/windows.py", "dy, dx = dst.ints[0] - src.ints[0], dst.ints[1] - src.ints[1]",
           "dy, dx = src.ints[0] - dst.ints[0], src.ints[1] - dst.ints[1]",
           "one seed's signal moved between windows the wrong way", ("tests/test_reverse_speed_paths.py", "-k", "moved_in_numbers")),
    Mutant("paste-numbers-unsigned", "zfvis/core/windows.py", "shifted(signal, -win.ints[0], -win.ints[1], *win.map_size)",
           "shifted(signal, win.ints[0], win.ints[1], *win.map_size)",
           "one seed's window pasted at the mirrored offset", ("tests/test_reverse_speed_paths.py", "-k", "moved_in_numbers")),
    Mutant("conv-window-numbers-transposed", _REV, "return [shifted(full, shifts[0], shifts[1], *in_win.size)]",
           "return [shifted(full, shifts[1], shifts[0], *in_win.size)]",
           "a windowed reverse convolution of one seed cut at its column offset for rows and the other way round",
           ("tests/test_windowed_ops.py",)),
    Mutant("global-hooks-ignored", _CAP, "every = any(getattr(mod, g, None)", "every = False and any(getattr(mod, g, None)",
           "a global module forward hook that changes outputs ignored by the reverse pass", (_CAPT, "-k", "global_module_hook")),
    Mutant("shape-not-per-seed", "zfvis/core/ops/args.py", "return torch.Size((len(image), *v[1:]))", "return v",
           "a shape taken from the signal (t.expand(a.shape)) keeps the recorded batch size per seed",
           ("tests/test_capture_fourth_sweep.py", "-k", "shape_taken")),
    Mutant("shape-output-no-first-dim", _CAP, "if isinstance(out, torch.Size) and len(out):",
           "if False:", "the probe never finds a shape whose first size is the batch",
           ("tests/test_capture_fourth_sweep.py", "-k", "shape_taken")),
    Mutant("function-not-named", "zfvis/core/graph.py", "        of[fxn].function = name", "        pass",
           "nodes inside a custom autograd.Function taken as computed with gradients off (no signal)",
           ("tests/test_capture_fourth_sweep.py", "-k", "cannot_follow")),
    Mutant("check-nan-scale", _GRAD, "scale = float(finite.abs().max()) if finite.numel() else 0.0",
           "scale = float(out.abs().max()) if out.numel() else 0.0",
           "the check's tolerance made from a NaN the model cleans later", ("tests/test_capture_fourth_sweep.py", "-k", "nan")),
    Mutant("numbers-only-calls-recorded", "zfvis/core/recorder.py", "if not random and all(_from_numbers(r) for r in reads):",
           "if not random and not reads:", "arithmetic on a tensor made from numbers, which the trace computes once, taken "
           "for a mismatch", ("tests/test_capture_fourth_sweep.py", "-k", "from_numbers")),
    Mutant("buffer-write-unnamed", _CAP, 'and str(a.reads[0][0]).startswith("buffer:"):', 'and False:',
           "a forward writing its own buffer refused blaming the next node's call (a hook?)",
           ("tests/test_capture_fourth_sweep.py", "-k", "naming_the_buffer")),
    Mutant("signal-path-through-gates", "zfvis/core/graph.py", "stack.extend(p for p in n.inputs if p.carries)",
           "stack.extend(p for p in n.inputs if p.carries or p.derived)",
           "a rounding that only gates the signal (detached) taken to be on its path, and refused",
           ("tests/test_capture_fourth_sweep.py", "-k", "index_computed")),
    Mutant("gradient-check-never-cached", _GRAD, "if keep or not site.checked:", "if True:",
           "the check of one image run again on every pass (slower only: results equal)",
           (_CAPT, "-k", "gradient_check")),
]

#: pytest's exit status -> outcome (1: a test failed; 2: collection failed, e.g. an import error).
_OUTCOMES = {0: "survived", 1: "killed", 2: "killed"}


@dataclasses.dataclass
class Result:
    """The outcome of one mutant.

    Attributes:
        mutant: The mutant.
        status: ``killed``, ``survived``, ``stale``, ``timeout`` or ``error``.
        seconds: Wall-clock seconds of its test run.
        detail: The last lines pytest printed (or why the mutant is stale).
    """

    mutant: Mutant
    status: str
    seconds: float = 0.0
    detail: str = ""

    @property
    def failed(self) -> bool:
        """Whether this outcome makes the check fail."""
        if self.status == "survived":
            return not self.mutant.equivalent
        return self.status in ("stale", "timeout", "error")


def repository_files(root: Path) -> list[str]:
    """Tracked files and untracked ones git does not ignore, relative to ``root``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})


def copy_repository(root: Path, dest: Path) -> None:
    """Copies the repository's files (see :func:`repository_files`) to ``dest``."""
    for rel in repository_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def apply(mutant: Mutant, repo: Path) -> str | None:
    """Applies ``mutant`` to the copy at ``repo``; returns why it is stale, or ``None``."""
    path = repo / mutant.file
    if not path.is_file():
        return f"stale mutant: {mutant.file} does not exist"
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.original)
    if count != 1:
        return f"stale mutant: the snippet occurs {count} times in {mutant.file} (it must occur exactly once)"
    path.write_text(text.replace(mutant.original, mutant.replacement), encoding="utf-8")
    return None


def run_mutant(mutant: Mutant, root: Path, timeout: float, *, mutate: bool = True) -> Result:
    """Copies the repository, applies the mutant (unless ``mutate`` is false) and runs its tests there."""
    with tempfile.TemporaryDirectory(prefix=f"zfvis-mutant-{mutant.id}-") as tmp:
        repo = Path(tmp) / "repo"
        copy_repository(root, repo)
        shared = root.parent / "shared"
        if shared.exists():  # the tests' real data sits beside the checkout
            (Path(tmp) / "shared").symlink_to(shared)
        stale = apply(mutant, repo) if mutate else None
        if stale is not None:
            return Result(mutant, "stale", detail=stale)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTHONPATH", None)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Result(mutant, "timeout", time.perf_counter() - start, f"over {timeout:.0f} s")
        seconds = time.perf_counter() - start
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        detail = "\n".join(lines[-3:])
        return Result(mutant, _OUTCOMES.get(proc.returncode, "error"), seconds, detail)


def select(only: str | None) -> list[Mutant]:
    """The mutants named in ``only`` (comma-separated ids), or all of them."""
    if not only:
        return list(MUTANTS)
    by_id = {m.id: m for m in MUTANTS}
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise SystemExit(f"unknown mutant id(s): {', '.join(unknown)} (see --list)")
    return [by_id[w] for w in wanted]


def print_table(mutants: Sequence[Mutant]) -> None:
    """The table: id, file, what it breaks, the tests that should kill it."""
    for m in mutants:
        mark = "  [equivalent]" if m.equivalent else ""
        print(f"{m.id:<24} {m.file}{mark}")
        print(f"    {m.original!r}  ->  {m.replacement!r}")
        print(f"    why: {m.why}")
        print(f"    tests: {' '.join(m.tests)}")
    print(f"{len(mutants)} mutants, {sum(m.equivalent for m in mutants)} marked equivalent")


def print_summary(results: Sequence[Result]) -> None:
    """One line per mutant, then the counts."""
    print(f"\n{'mutant':<24} {'status':<9} {'seconds':>7}  file")
    for r in results:
        status = r.status + ("*" if r.mutant.equivalent and r.status == "survived" else "")
        print(f"{r.mutant.id:<24} {status:<9} {r.seconds:7.1f}  {r.mutant.file}")
        if r.failed:
            for line in r.detail.splitlines():
                print(f"    {line}")
    counts = {s: sum(r.status == s for r in results) for s in ("killed", "survived", "stale", "timeout", "error")}
    equivalent = sum(r.status == "survived" and r.mutant.equivalent for r in results)
    print(f"\n{len(results)} mutants: {counts['killed']} killed, {counts['survived']} survived "
          f"({equivalent} of them equivalent, marked *), {counts['stale']} stale, {counts['timeout']} timed out, "
          f"{counts['error']} errors")


def baseline(mutants: Sequence[Mutant], root: Path, timeout: float) -> int:
    """Runs each distinct test selection on the unmutated copy; 1 if any does not pass."""
    selections = list(dict.fromkeys(m.tests for m in mutants))
    bad = 0
    with progress(len(selections), "baseline", "selection") as bar:
        for tests in selections:
            r = run_mutant(dataclasses.replace(mutants[0], tests=tests), root, timeout, mutate=False)
            ok = r.status == "survived"
            bad += not ok
            print(f"{'passes' if ok else r.status:<9} {r.seconds:7.1f}  {' '.join(tests)}")
            if not ok:
                print("    " + r.detail.replace("\n", "\n    "))
            bar.update(1)
    print(f"\n{len(selections)} test selections, {bad} not passing on the unmutated code")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the mutation check; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutant ids to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant's test run (default 240)")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository to copy (default: this checkout)")
    parser.add_argument("--baseline", action="store_true",
                        help="run each mutant's tests on the unmutated copy instead (they must all pass)")
    args = parser.parse_args(argv)
    mutants = select(args.only)
    if args.list:
        print_table(mutants)
        return 0
    if args.baseline:
        return baseline(mutants, args.root.resolve(), args.timeout)
    results: list[Result] = []
    with progress(len(mutants), "mutants", "mutant") as bar:
        for m in mutants:
            bar.set_postfix_str(m.id)
            results.append(run_mutant(m, args.root.resolve(), args.timeout))
            bar.update(1)
    print_summary(results)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
