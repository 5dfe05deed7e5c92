"""``torch.compile``: every model compiles to one graph (``fullgraph=True`` fails on any graph
break), forward and backward, in training and eval mode, and computes what eager computes; one
compile serves many lengths; the LSH windows' operators pass ``torch.library.opcheck``.

Most checks compile with the ``aot_eager`` backend: Dynamo's graph capture and AOTAutograd's
forward/backward split, which is where breaks and wrong gradients come from, without waiting for
Inductor's C++ code generation (that is the ``slow`` test at the end)."""

import copy

import pytest
import torch

from reformer import Reformer, ReformerEncDec, ReformerLM
from reformer.attention.decode import DecodingCache
from reformer.attention.options import LSHOptions

BASE = dict(num_tokens=64, dim=32, depth=2, heads=2, bucket_size=8, n_hashes=2, max_seq_len=128, causal=True)
# Each case turns on several features at once (kept few: each compile takes seconds).
CASES = {
    "lsh-strict-dropouts": dict(lsh_dropout=0.1, ff_dropout=0.1, post_attn_dropout=0.1),
    "lsh-bidirectional-masked-memory-rotary": dict(causal=False, num_mem_kv=2, position_emb="rotary"),
    "local-full-lsh-absolute-standard": dict(
        attn_layers=("local", "full", "lsh"), depth=3, position_emb="absolute", residual="standard"
    ),  # fmt: skip
    "axial-local-heads-no-duplicates": dict(
        n_local_attn_heads=1, allow_duplicate_attention=False, attend_across_buckets=False
    ),  # fmt: skip
    "fixed-chunked-tied": dict(position_emb="fixed", ff_chunks=2, attn_chunks=2, weight_tie=True),
    "dense-separate-qk": dict(use_full_attn=True, shared_qk=False, position_emb="absolute"),
    "no-positions-glu-scalenorm-trax-causal": dict(
        position_emb="none", ff_glu=True, use_scale_norm=True, strict_causal=False
    ),  # fmt: skip
}


def _tokens(length: int = 64) -> torch.Tensor:
    return torch.randint(0, BASE["num_tokens"], (2, length), generator=torch.Generator().manual_seed(3))


def _compiled_equals_eager(model: torch.nn.Module, *args, backend: str = "aot_eager", atol: float = 1e-6, **kwargs):
    """Forward and backward of ``model`` and of its compiled copy from the same RNG state: equal
    outputs and parameter gradients."""
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)  # a graph break raises
    results = []
    for net in (compiled, model):
        torch.manual_seed(1)
        out = net(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        results.append(out)
    torch.testing.assert_close(results[0], results[1], atol=atol, rtol=0)
    pairs = [(p.grad, q.grad) for p, q in zip(compiled_model.parameters(), model.parameters(), strict=True)]
    assert all((a is None) == (b is None) for a, b in pairs)
    assert any(a is not None for a, _ in pairs)
    for a, b in pairs:
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _graph_counter():
    """A ``torch.compile`` backend that runs each graph as it is, and the list of graphs it got."""
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm

    return graphs, count_graphs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or guards carried between tests
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES)
def test_reformer_lm_compiles_to_one_graph_and_equals_eager(case, training):
    torch.manual_seed(0)
    model = ReformerLM(**{**BASE, **CASES[case]}).train(training)
    kwargs = {}
    if not model.config.causal:  # padding: the last 14 positions of row 1 hidden
        mask = torch.ones(2, 64, dtype=torch.bool)
        mask[1, 50:] = False
        kwargs["input_mask"] = mask
    _compiled_equals_eager(model, _tokens(), **kwargs)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_reformer_on_embeddings_compiles_to_one_graph(training):
    torch.manual_seed(0)
    model = Reformer(dim=32, depth=2, heads=2, bucket_size=8, n_hashes=2, causal=True).train(training)
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(4))
    _compiled_equals_eager(model, x)


def test_encoder_decoder_compiles_to_one_graph():
    torch.manual_seed(0)
    model = ReformerEncDec(dim=32, enc_num_tokens=64, enc_depth=1, enc_max_seq_len=64, dec_num_tokens=64,
                           dec_depth=1, dec_max_seq_len=64, bucket_size=8, n_hashes=2).train()  # fmt: skip
    _compiled_equals_eager(model, _tokens(), _tokens(), return_loss=True)


def test_one_compile_serves_many_lengths():
    """``dynamic=True``: lengths that are and are not multiples of the bucket size, one graph."""
    torch.manual_seed(0)
    model = ReformerLM(**BASE).eval()
    graphs, count_graphs = _graph_counter()
    compiled = torch.compile(model, backend=count_graphs, dynamic=True, fullgraph=True)
    for length in (64, 45, 101, 128):
        tokens = _tokens(length)
        torch.testing.assert_close(compiled(tokens), model(tokens), atol=1e-6, rtol=0)
    assert len(graphs) == 1


def test_the_default_compile_serves_new_lengths_in_training_after_one_recompile():
    torch.manual_seed(0)
    model = ReformerLM(**BASE, lsh_dropout=0.1).train()
    graphs, count_graphs = _graph_counter()
    compiled = torch.compile(model, backend=count_graphs, fullgraph=True)
    for length in (64, 80, 45, 128):
        compiled(_tokens(length)).square().mean().backward()
    assert len(graphs) == 2  # the first length static, then one graph for every length


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_lsh_windows_operator_passes_opcheck(training):
    gen = torch.Generator().manual_seed(0)
    qk = torch.randn(2, 30, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 30, 16, generator=gen, requires_grad=True)
    buckets = torch.randint(0, 4, (2, 2, 30), generator=gen)
    key_mask = torch.rand(2, 30, generator=gen) > 0.2
    options = LSHOptions(bucket_size=8, causal=True, lsh_dropout=0.2)
    seed = torch.tensor(7)
    args = (qk, v, buckets, key_mask, None, options.as_text, 4, training, seed)
    torch.library.opcheck(torch.ops.reformer.lsh_windows.default, args)


def test_seeded_rotations_operator_passes_opcheck():
    torch.library.opcheck(torch.ops.reformer.seeded_normal.default, (5, [2, 3, 4]))


@pytest.mark.slow  # Inductor generates and compiles C++ (about a minute on 2 cores)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_inductor_compiled_model_equals_eager(training):
    """Inductor's own random numbers differ from eager's; ``fallback_random`` makes it draw
    eager's, so training-mode rotations and dropout can be compared."""
    torch.manual_seed(0)
    model = ReformerLM(**{**BASE, "lsh_dropout": 0.1}).train(training)
    with torch._inductor.config.patch(fallback_random=True):
        _compiled_equals_eager(model, _tokens(), backend="inductor", atol=1e-5)


@pytest.mark.slow  # Inductor compiles the training step (about a minute on 2 cores)
def test_cli_trains_through_torch_compile_and_reports_the_compile_time(tmp_path, capsys):
    from reformer.cli import main

    args = ["train", "--preset", "tiny", "--seq-len", "64", "--steps", "3", "--batch-size", "2", "--eval-every", "3",
            "--save-every", "3", "--out", str(tmp_path / "run"), "--compile"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "torch.compile: first step" in err and "(compiling), then" in err


DECODE_CASES = {
    "lsh-axial": {},
    "local-heads-memory-rotary-no-duplicates": dict(
        n_local_attn_heads=1, num_mem_kv=2, position_emb="rotary", allow_duplicate_attention=False
    ),  # fmt: skip
    "local-full-lsh-absolute-standard": dict(
        attn_layers=("local", "full", "lsh"), depth=3, position_emb="absolute", residual="standard"
    ),  # fmt: skip
    "fixed-tied-chunked": dict(position_emb="fixed", weight_tie=True, ff_chunks=2),
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_step_compiles_to_one_graph_for_every_position(case):
    """40 positions through a compiled cache (storage sized up front, as ``generate`` does): one
    graph, no recompile, and each step's logits those of eager decoding."""
    torch.manual_seed(0)
    model = ReformerLM(**{**BASE, **DECODE_CASES[case]}).eval()
    tokens = _tokens(60)
    graphs, count_graphs = _graph_counter()
    eager, compiled = DecodingCache(capacity=60), DecodingCache(capacity=60, compile=count_graphs)
    with torch.no_grad():
        for cache in (eager, compiled):
            model(tokens[:, :20], cache=cache)
        for i in range(20, 60):
            token = tokens[:, : i + 1].clone()[:, -1:]  # (as generate passes it: the end of a growing history)
            expected = model(token, cache=eager)
            torch.testing.assert_close(model(token, cache=compiled), expected, atol=1e-5, rtol=0)
    assert len(graphs) == 1


def test_compiled_decoding_recompiles_once_when_the_storage_grows():
    """Past the room a cache was given, its storage doubles: a new shape, so one more graph, and
    the logits still those of a full forward."""
    torch.manual_seed(0)
    model = ReformerLM(**BASE).eval()
    tokens = _tokens(48)
    graphs, count_graphs = _graph_counter()
    cache = DecodingCache(capacity=24, compile=count_graphs)
    with torch.no_grad():
        model(tokens[:, :16], cache=cache)
        steps = torch.cat([model(tokens[:, i : i + 1], cache=cache) for i in range(16, 48)], dim=1)
        torch.testing.assert_close(steps, model(tokens)[:, 16:], atol=1e-5, rtol=0)
    assert len(graphs) == 2


def test_generate_with_compile_needs_the_cache():
    model = ReformerLM(**BASE).eval()
    with pytest.raises(ValueError, match="compile compiles the cached decode step: it needs use_cache=True"):
        model.generate(_tokens(8), 4, use_cache=False, compile=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        model.generate(_tokens(8), 4, compile="yes")


@pytest.mark.slow  # Inductor compiles the decode step (about half a minute on 2 cores)
def test_cli_generates_through_torch_compile_the_same_tokens(tmp_path, capsys):
    """Greedy decoding through Inductor writes the text eager decoding writes, and reports the
    compile time."""
    from reformer.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "--preset", "tiny", "--seq-len", "64", "--steps", "2", "--batch-size", "2",
                 "--eval-every", "2", "--save-every", "2", "--out", run]) == 0  # fmt: skip
    capsys.readouterr()
    texts = []
    for extra in ([], ["--compile"]):
        args = ["generate", "--checkpoint", run, "--prompt", "The ", "--max-new-tokens", "30", "--temperature", "0"]
        assert main(args + extra) == 0
        captured = capsys.readouterr()
        texts.append(captured.out)
    assert texts[0] == texts[1] and len(texts[0]) > len("The ")
    assert "torch.compile: first decode step" in captured.err and "ms per token" in captured.err
