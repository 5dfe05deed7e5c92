"""The fused Triton kernel against the chunked path and the dense reference.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set before triton is imported), so sizes stay small."""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from builders import lsh_inputs, window_options  # noqa: E402

from reformer.attention.backends import lsh_attention  # noqa: E402
from reformer.attention.chunked import lsh_attention_chunked  # noqa: E402
from reformer.attention.lsh import LSHAttention  # noqa: E402
from reformer.attention.reference import lsh_attention_reference  # noqa: E402
from reformer.attention.slots import WindowRules, sort_into_slots  # noqa: E402
from reformer.attention.triton_lsh import operator_args  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # causal, strict_causal, key mask, attend_across_buckets, n_hashes, length, bucket_size
    (False, True, False, True, 1, 64, 16),  # non-causal, one round
    (True, True, False, True, 2, 64, 16),  # strict causal (the default)
    (True, True, True, True, 2, 50, 16),  # strict causal, padding, length not a multiple
    (True, False, True, True, 2, 64, 16),  # classic causal
    (True, False, True, False, 2, 64, 16),  # classic, same-bucket only; queries that see only themselves
    (False, True, True, True, 2, 45, 12),  # bucket not a power of two: dead lanes in each block
    (False, True, False, True, 1, 12, 16),  # one chunk: the window holds it twice
]


def _case(causal, strict, masked, across, n_hashes, length, bucket_size, d=32):
    qk = torch.randn(2, length, d, device=DEVICE, requires_grad=True)
    v = torch.randn(2, length, d, device=DEVICE, requires_grad=True)
    buckets = torch.randint(0, 4, (2, n_hashes, length), device=DEVICE)
    key_mask = torch.rand(2, length, device=DEVICE) > 0.3 if masked else None
    options = window_options(bucket_size, causal, strict, across)
    return qk, v, buckets, options, dict(n_buckets=4, key_mask=key_mask)


def _triton(qk, v, buckets, options, call):
    return lsh_attention(qk, v, buckets, options.replace(attn_backend="triton"), **call)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_chunked_and_reference(case):
    qk, v, buckets, options, call = _case(*case)
    out, attn = _triton(qk, v, buckets, options, call)
    assert attn is None
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qk, v), grad)
    expected = lsh_attention_chunked(qk, v, buckets, options, **call)[0]
    expected_grads = torch.autograd.grad(expected, (qk, v), grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    reference = lsh_attention_reference(qk.detach().double(), v.detach().double(), buckets, options, **call)[0]
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=0)


def test_head_dims_64_and_128():
    for d in (64, 128):
        qk, v, buckets, options, call = _case(True, True, True, True, 2, 32, 16, d=d)
        out = _triton(qk, v, buckets, options, call)[0]
        torch.testing.assert_close(out, lsh_attention_chunked(qk, v, buckets, options, **call)[0], atol=1e-5, rtol=0)


def test_a_torch_without_triton_op_is_named(monkeypatch):
    monkeypatch.delattr(torch.library, "triton_op")
    qk, v, buckets, options, call = _case(True, True, False, True, 1, 16, 16)
    with pytest.raises(RuntimeError, match=r"has no torch.library.triton_op \(torch >= 2.6 has\)"):
        _triton(qk, v, buckets, options, call)


def _recording_aot_eager():
    """The ``aot_eager`` backend of ``torch.compile``, and the graphs it got: Dynamo's, and
    AOTAutograd's forward and backward."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.debugging import aot_eager

    graphs = {"dynamo": [], "forward": [], "backward": []}

    def recorder(kind):
        def run_as_is(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return run_as_is

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot_eager(gm, example_inputs, fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))

    return graphs, backend


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or guards carried between tests
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compiled_triton_backend_is_one_graph_equal_to_eager(training):
    """``torch.compile(fullgraph=True)`` with ``aot_eager`` (Dynamo, then AOTAutograd's
    forward/backward split) through the triton backend: outputs and gradients equal eager's,
    and the graphs hold the kernels: the opaque operators under the interpreter, the kernel
    launches themselves (``triton_op``) with compiled kernels."""
    layer = LSHAttention(bucket_size=16, n_hashes=2, causal=True, max_seq_len=64, backend="triton").train(training)
    gen = torch.Generator().manual_seed(0)
    qk, v = (torch.randn(2, 30, 32, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    mask = (torch.rand(2, 30, generator=gen) > 0.2).to(DEVICE)
    grad = torch.randn(2, 30, 32, generator=gen).to(DEVICE)
    graphs, backend = _recording_aot_eager()
    results = []
    for net in (torch.compile(layer, backend=backend, fullgraph=True), layer):  # a graph break raises
        torch.manual_seed(1)  # the same training rotations
        out = net(qk, v, input_mask=mask)[0]
        results.append((out, *torch.autograd.grad(out, (qk, v), grad)))
    for compiled, eager in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert len(graphs["dynamo"]) == 1
    if DEVICE == "cpu":
        ops = torch.ops.reformer
        expected = [ops.lsh_triton_windows.default], [ops.lsh_triton_windows_backward.default]
    else:
        launch = torch.ops.higher_order.triton_kernel_wrapper_functional
        expected = [launch], [launch, launch]  # the forward kernel; the dq and the dk/dv kernels
    for kind, kernels in zip(("forward", "backward"), expected, strict=True):
        (graph,) = graphs[kind]
        assert [node.target for node in graph.graph.nodes if node.target in kernels] == kernels


@pytest.mark.usefixtures("fresh_dynamo")
def test_exported_triton_backend_keeps_the_operator_and_equals_eager():
    """``torch.export`` keeps the forward operator whole (a ``triton_op`` too: an exported program
    stays free of kernel source) and the exported program computes what eager computes."""
    layer = LSHAttention(bucket_size=16, n_hashes=2, max_seq_len=64, backend="triton").eval()
    gen = torch.Generator().manual_seed(0)
    qk, v = (torch.randn(2, 40, 32, generator=gen).to(DEVICE) for _ in range(2))
    with torch.no_grad():
        program = torch.export.export(layer, (qk, v))
        torch.testing.assert_close(program.module()(qk, v)[0], layer(qk, v)[0], atol=1e-6, rtol=0)
    targets = [node.target for node in program.graph.nodes]
    assert targets.count(torch.ops.reformer.lsh_triton_windows.default) == 1


@pytest.mark.parametrize(
    "masked, causal, strict", [(True, True, True), (False, True, False)], ids=["strict-masked", "classic"]
)
def test_operators_pass_opcheck(masked, causal, strict):
    """Schema, fake (shape) implementations, autograd registration and AOTAutograd's dispatch of
    both operators: every sub-test of ``opcheck`` runs under the interpreter on CPU tensors."""
    qk, v, buckets, key_mask = lsh_inputs(20, 2, masked, batch=1, device=DEVICE)
    inputs, layout = sort_into_slots(qk, v, buckets, key_mask, 8, 4)
    inputs = inputs._make(t.requires_grad_() for t in inputs)
    args = operator_args(inputs, layout, WindowRules(causal, strict, True, -5e4))
    torch.library.opcheck(torch.ops.reformer.lsh_triton_windows.default, args)
    out, lse, stats = (t.detach() for t in torch.ops.reformer.lsh_triton_windows(*args))
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]  # (its gradient has none)
    backward_args = (torch.randn_like(out), torch.randn_like(lse), out, stats, *plain)
    torch.library.opcheck(torch.ops.reformer.lsh_triton_windows_backward.default, backward_args)


#: Traces the operators with compiled (not interpreted) kernels on fake tensors, as AOTAutograd
#: does under ``torch.compile``; prints the kernels each launches. No GPU is needed: nothing runs.
_TRACE_LAUNCHES = """
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from reformer.attention.slots import WindowRules, sort_into_slots
from reformer.attention.triton_lsh import operator_args

def launches(op, *args):
    graph = make_fx(dispatch_functionalize(op), tracing_mode="fake")(*args)
    launch = torch.ops.higher_order.triton_kernel_wrapper_functional
    return " ".join(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
                    for node in graph.graph.nodes if node.target is launch)

inputs, layout = sort_into_slots(torch.randn(2, 30, 16), torch.randn(2, 30, 16), torch.randint(0, 4, (2, 2, 30)),
                                 torch.rand(2, 30) > 0.2, 8, 4)
args = operator_args(inputs, layout, WindowRules(True, True, True, -5e4))
out, lse, stats = torch.empty(2, 64, 16), torch.empty(2, 64), torch.empty(2, 64, 2)
print(launches(torch.ops.reformer.lsh_triton_windows, *args))
print(launches(torch.ops.reformer.lsh_triton_windows_backward, out, lse, out, stats, *args))
"""


def test_operators_show_their_kernel_launches_to_aot_autograd():
    """With compiled kernels the operators are ``triton_op``s: AOTAutograd's functional tracing
    sees the launches of the forward kernel, and of the dq and dk/dv kernels, that Inductor compiles.
    Run without ``TRITON_INTERPRET`` in a fresh process. Tracing only: without a GPU Triton has no
    target to analyse the kernels for, and torch takes every tensor argument as written to."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _TRACE_LAUNCHES], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["_forward_kernel", "_backward_dq_kernel _backward_dkv_kernel"]
