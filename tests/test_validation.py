"""Input-validation audit: every public constructor, forward and command-line option rejects bad
values with a clear error that names the argument - never an internal error from deep inside
torch. Each row is one distinct bad input."""

import traceback
from pathlib import Path

import pytest
import torch

from reformer import LSHAttention, LSHSelfAttention, Reformer, ReformerConfig, ReformerEncDec, ReformerLM
from reformer.cli import main
from reformer.train import TrainConfig

OK = dict(num_tokens=16, dim=16, depth=1, heads=2, bucket_size=4, max_seq_len=32, causal=True)
STACK = {k: v for k, v in OK.items() if k != "num_tokens"}
PACKAGE = str(Path(__import__("reformer").__file__).parent)


def lm(**overrides):
    return ReformerLM(**{**OK, **overrides})


def tokens(*shape, high=16, dtype=torch.long):
    return torch.randint(0, high, shape).to(dtype)


CASES = [
    # constructors (every ReformerConfig field is checked in ReformerConfig.__post_init__)
    ("num_tokens 0", lambda: lm(num_tokens=0), "num_tokens"),
    ("num_tokens str", lambda: lm(num_tokens="16"), "num_tokens"),
    ("dim negative", lambda: lm(dim=-4), "dim"),
    ("depth 0", lambda: lm(depth=0), "depth"),
    ("heads do not divide dim", lambda: lm(heads=3), "divisible"),
    ("bucket_size 0", lambda: lm(bucket_size=0), "bucket_size"),
    ("n_hashes 0", lambda: lm(n_hashes=0), "n_hashes"),
    ("n_buckets odd", lambda: lm(n_buckets=3), "n_buckets"),
    ("n_buckets odd factor", lambda: lm(n_buckets=(4, 3)), "n_buckets"),
    ("max_seq_len 0", lambda: lm(max_seq_len=0), "max_seq_len"),
    ("lsh_dropout 1.5", lambda: lm(lsh_dropout=1.5), "lsh_dropout"),
    ("ff_dropout negative", lambda: lm(ff_dropout=-0.1), "ff_dropout"),
    ("layer_dropout 1", lambda: lm(layer_dropout=1.0), "layer_dropout"),
    ("ff_activation unknown", lambda: lm(ff_activation="swishy"), "ff_activation"),
    ("ff_chunks 0", lambda: lm(ff_chunks=0), "ff_chunks"),
    ("attn_chunks 0", lambda: lm(attn_chunks=0), "attn_chunks"),
    ("num_mem_kv negative", lambda: lm(num_mem_kv=-1), "num_mem_kv"),
    ("attn_layers unknown kind", lambda: lm(attn_layers=("lsh", "sparse")), "attn_layers"),
    ("attn_layers empty", lambda: lm(attn_layers=()), "attn_layers"),
    ("axial shape with 0", lambda: lm(axial_position_shape=(0, 8)), "axial_position_shape"),
    ("n_local_attn_heads > heads", lambda: lm(n_local_attn_heads=3), "n_local_attn_heads"),
    ("unknown option", lambda: lm(bucketsize=4), "unknown option"),
    ("config and options", lambda: ReformerLM(ReformerConfig(**OK), dim=8), "either config"),
    ("reversible_output", lambda: ReformerConfig(**OK, reversible_output="sum"), "reversible_output"),
    ("qk_logit_scale 0", lambda: ReformerConfig(**OK, qk_logit_scale=0), "qk_logit_scale"),
    ("norm_eps 0", lambda: ReformerConfig(**OK, norm_eps=0.0), "norm_eps"),
    ("LSHAttention bucket_size", lambda: LSHAttention(bucket_size=0), "bucket_size"),
    ("LSHAttention dropout", lambda: LSHAttention(dropout=2.0), "dropout"),
    ("LSHSelfAttention heads 0", lambda: LSHSelfAttention(dim=16, heads=0), "heads"),
    ("rotary with odd dim_head", lambda: LSHSelfAttention(dim=16, heads=2, dim_head=3, rotary_emb=True), "rotary"),
    ("EncDec sets causal", lambda: ReformerEncDec(dim=16, enc_num_tokens=8, dec_num_tokens=8, causal=True), "causal"),
    # forward inputs
    ("float tokens", lambda: lm()(tokens(1, 8, dtype=torch.float32)), "integer"),
    ("1-d tokens", lambda: lm()(tokens(8)), "tokens must have shape"),
    ("token id too large", lambda: lm()(tokens(1, 8, high=17) + 1), "num_tokens"),
    ("negative token id", lambda: lm()(tokens(1, 8) - 20), "num_tokens"),
    ("longer than max_seq_len", lambda: lm()(tokens(1, 33)), "max_seq_len"),
    ("float input_mask", lambda: lm()(tokens(1, 8), input_mask=torch.ones(1, 8)), "input_mask"),
    ("input_mask shape", lambda: lm()(tokens(1, 8), input_mask=torch.ones(1, 7, dtype=torch.bool)), "input_mask"),
    ("keys width", lambda: lm()(tokens(1, 8), keys=torch.randn(1, 4, 15)), "keys"),
    ("context_mask without keys", lambda: lm()(tokens(1, 8), context_mask=torch.ones(1, 4, dtype=torch.bool)), "keys"),
    (
        "Reformer x width",
        lambda: Reformer(**{k: v for k, v in OK.items() if k != "num_tokens"})(torch.randn(1, 8, 8)),
        "x",
    ),
    ("layer x width", lambda: LSHSelfAttention(dim=16, heads=2)(torch.randn(1, 8, 8)), "x must have shape"),
    ("layer integer x", lambda: LSHSelfAttention(dim=16, heads=2)(torch.ones(1, 8, 16, dtype=torch.long)), "floating"),
    ("qk/v lengths differ", lambda: LSHAttention()(torch.randn(2, 8, 4), torch.randn(2, 9, 4)), "qk and v"),
    ("qk 2-d", lambda: LSHAttention()(torch.randn(8, 4), torch.randn(8, 4)), "qk must have shape"),
    ("qk/v dtypes differ", lambda: LSHAttention()(torch.randn(2, 8, 4), torch.randn(2, 8, 4).double()), "dtype"),
    ("empty sequence", lambda: LSHAttention()(torch.randn(2, 0, 4), torch.randn(2, 0, 4)), "len >= 1"),
    ("attention chunks 0", lambda: LSHAttention()(torch.randn(2, 8, 4), torch.randn(2, 8, 4), chunks=0), "chunks"),
    # generation
    ("empty prompt", lambda: lm().generate(tokens(1, 0), 4), "prompt"),
    ("prompt too long", lambda: lm().generate(tokens(1, 40), 4), "max_seq_len"),
    ("top_p 0", lambda: lm().generate(tokens(1, 4), 4, top_p=0.0), "top_p"),
    ("top_k 0", lambda: lm().generate(tokens(1, 4), 4, top_k=0), "top_k"),
    ("temperature negative", lambda: lm().generate(tokens(1, 4), 4, temperature=-1), "temperature"),
    ("max_new_tokens float", lambda: lm().generate(tokens(1, 4), 2.5), "max_new_tokens"),
    ("unknown generate option", lambda: lm().generate(tokens(1, 4), 2, beams=3), "beams"),
    # training
    ("TrainConfig steps 0", lambda: TrainConfig(steps=0), "steps"),
    ("TrainConfig warmup negative", lambda: TrainConfig(warmup_steps=-1), "warmup_steps"),
    ("TrainConfig precision", lambda: TrainConfig(precision="fp8"), "precision"),
    ("TrainConfig clip_grad", lambda: TrainConfig(clip_grad=-1.0), "clip_grad"),
    ("TrainConfig min_lr_ratio", lambda: TrainConfig(min_lr_ratio=2.0), "min_lr_ratio"),
    # checkpoints
    ("from_pretrained missing dir", lambda: ReformerLM.from_pretrained("/nonexistent/model"), "config.json"),
]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error_from_our_code(call, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as info:
        call()
    assert match in str(info.value), str(info.value)
    # raised by a check in this package (or Python's own argument binding), not deep inside torch
    frames = traceback.extract_tb(info.value.__traceback__)
    origin = frames[-1].filename
    assert origin.startswith(PACKAGE) or "beams" in match, f"raised from {origin}: {info.value}"


def _cli_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects a bad choice itself (usage line + error, exit 2)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err


FAST = ["--data", "builtin", "--preset", "tiny", "--seq-len", "64", "--batch-size", "2"]
CLI_CASES = [
    (["train", *FAST, "--steps", "0"], "--steps"),
    (["train", *FAST, "--lr", "-1"], "--lr"),
    (["train", *FAST, "--batch-size", "0"], "--batch-size"),
    (["train", *FAST, "--seq-len", "0"], "--seq-len"),
    (["train", *FAST, "--grad-accum", "0"], "--grad-accum"),
    (["train", *FAST, "--warmup", "-5"], "--warmup"),
    (["train", *FAST, "--eval-every", "0"], "--eval-every"),
    (["train", *FAST, "--keep-last", "0"], "--keep-last"),
    (["train", *FAST, "--save-every", "0"], "--save-every"),
    (["train", *FAST, "--precision", "fp8"], "--precision"),
    (["generate", "--checkpoint", "{run}", "--prompt", "", "--max-new-tokens", "2"], "--prompt"),
    (["generate", "--checkpoint", "{run}", "--prompt", "a", "--top-p", "2"], "--top-p"),
    (["generate", "--checkpoint", "{run}", "--prompt", "a", "--top-k", "0"], "--top-k"),
    (["generate", "--checkpoint", "{run}", "--prompt", "a", "--temperature", "-1"], "--temperature"),
    (["generate", "--checkpoint", "{run}", "--prompt", "a", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "--checkpoint", "{run}", "--prompt", "a", "--max-new-tokens", "many"], "--max-new-tokens"),
    (["eval", "--checkpoint", "{run}", "--batches", "0"], "--batches"),
    (["eval", "--checkpoint", "{run}", "--seq-len", "-1"], "--seq-len"),
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *FAST, "--steps", "2", "--eval-every", "2", "--out", str(run)]) == 0
    return str(run)


@pytest.mark.parametrize(
    ("argv", "match"), CLI_CASES, ids=[" ".join(a[:1] + [a[-2], repr(a[-1])]) for a, _ in CLI_CASES]
)
def test_bad_command_line_option_is_a_one_line_error(argv, match, trained_run, capsys, tmp_path):
    argv = [a.replace("{run}", trained_run) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "new")]
    err = _cli_error(capsys, argv)
    assert match in err, err
    assert not (tmp_path / "new").exists()  # nothing written for a rejected run


def test_the_audit_covers_at_least_forty_distinct_inputs():
    assert len(CASES) + len(CLI_CASES) >= 40
