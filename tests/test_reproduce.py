"""The machinery of the paper's experiments (results are not tests): the duplication task as the
experiment draws it, masked accuracy, eval-time attention switching, the tables, and both
``reformer reproduce`` commands end to end at toy sizes."""

import json
from dataclasses import asdict

import pytest
import torch
from torch import nn

from reformer import ReformerLM
from reformer.cli import main
from reformer.config import ReformerConfig
from reformer.reproduce import (
    DUPLICATION_SCALES,
    PAPER_TABLE2,
    DuplicationConfig,
    LMConfig,
    duplication_accuracy,
    duplication_table,
    lm_table,
    masked_accuracy,
    parse_attention,
)
from reformer.switch import switch_attention

TINY = dict(num_tokens=20, dim=32, depth=2, heads=2, bucket_size=8, max_seq_len=64, causal=True, n_hashes=2)


def _tokens(n=64, batch=2, seed=0):
    return torch.randint(0, 20, (batch, n), generator=torch.Generator().manual_seed(seed))


def _eval_model(**overrides):
    torch.manual_seed(0)
    return ReformerLM(**{**TINY, **overrides}).eval()


@pytest.mark.parametrize("scale", sorted(DUPLICATION_SCALES))
def test_experiment_task_uses_symbols_1_to_127_and_scores_the_second_copy(scale):
    cfg = DUPLICATION_SCALES[scale]
    assert cfg.model_config("full").num_tokens == 128 and cfg.model_config("lsh-2").n_hashes == 2
    task = DuplicationConfig(seq_len=64, batch_size=64).task()
    tokens, scored = task.next_batch()  # (64, 64)
    w = tokens[:, 1:32]
    assert set(w.unique().tolist()) == set(range(1, 128))  # 1984 draws cover all 127 symbols
    assert torch.equal(tokens[:, 33:], w) and not tokens[:, [0, 32]].any()
    assert scored[:, 33:].all() and not scored[:, :33].any()


def test_masked_accuracy_counts_only_scored_positions():
    targets = torch.tensor([[1, 2, 3, 4]])
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 0, 3, 0]]), 5).float()  # right at 0 and 2
    assert masked_accuracy(logits, targets, torch.tensor([[True, True, True, True]])) == 0.5
    assert masked_accuracy(logits, targets, torch.tensor([[False, False, True, True]])) == 0.5
    assert masked_accuracy(logits, targets, torch.tensor([[True, False, True, False]])) == 1.0
    with pytest.raises(ValueError, match="no position"):
        masked_accuracy(logits, targets, torch.zeros(1, 4, dtype=torch.bool))


class _Copier(nn.Module):
    """Predicts token ``i + 1`` as the token ``shift`` positions before it (``shift = seq_len / 2``:
    a perfect duplication model on the second copy)."""

    def __init__(self, shift: int, vocab: int):
        super().__init__()
        self.shift, self.vocab = shift, vocab
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):  # (b, n) -> (b, n, vocab)
        source = torch.roll(x, self.shift - 1, dims=1)  # source[i] = x[i + 1 - shift]
        return torch.nn.functional.one_hot(source, self.vocab).float()


def test_duplication_accuracy_is_next_token_accuracy_on_the_second_copy():
    cfg = DuplicationConfig(seq_len=32, batch_size=4)
    assert duplication_accuracy(_Copier(16, 128), cfg.task(seed=3), batches=3) == 1.0
    assert duplication_accuracy(_Copier(15, 128), cfg.task(seed=3), batches=3) < 0.2  # off by one position


def test_switch_to_full_attention_equals_a_model_built_with_it_and_records_it(tmp_path):
    x = _tokens()
    model = _eval_model()
    lsh_out = model(x)
    switch_attention(model, full_attention=True)
    assert model.config.use_full_attn and model.reformer.config is model.config
    dense = ReformerLM(**{**TINY, "use_full_attn": True}).eval()
    dense.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)
    assert not torch.allclose(model(x), lsh_out)
    model.save_pretrained(tmp_path / "m")  # the saved config says what the model computes
    torch.testing.assert_close(ReformerLM.from_pretrained(tmp_path / "m").eval()(x), dense(x), rtol=0, atol=0)
    switch_attention(model, full_attention=False)
    torch.testing.assert_close(model(x), lsh_out, rtol=0, atol=0)


def test_changing_n_hashes_redraws_rotations_changes_outputs_and_is_reversible():
    x = _tokens()
    model = _eval_model()
    two = model(x)
    switch_attention(model, n_hashes=8)
    eight = model(x)
    assert not torch.allclose(eight, two)
    rebuilt = ReformerLM(**{**TINY, "n_hashes": 8}).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(eight, rebuilt(x), rtol=0, atol=0)
    for attn in [m.lsh_attn for m in model.modules() if hasattr(m, "lsh_attn")]:
        assert attn.n_hashes == 8 and attn._eval_rotations[1].shape[2] == 8  # (sets, d, n_hashes, n_buckets / 2)
    switch_attention(model, n_hashes=2)
    torch.testing.assert_close(model(x), two, rtol=0, atol=0)


def test_switch_keeps_local_layers_and_refuses_models_without_lsh():
    model = _eval_model(attn_layers=("local", "lsh"))
    x = _tokens()
    switch_attention(model, full_attention=True)
    assert model.config.attn_layers == ("local", "full")
    dense = ReformerLM(**{**TINY, "attn_layers": ("local", "full")}).eval()
    dense.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LSH attention layer"):
        switch_attention(_eval_model(attn_layers=("local",)), n_hashes=4)
    with pytest.raises(ValueError, match="n_hashes"):
        switch_attention(model, n_hashes=0)


def test_eval_cli_switches_attention_without_changing_the_checkpoint(tmp_path, capsys):
    lsh, full = tmp_path / "lsh", tmp_path / "full"
    _eval_model(num_tokens=256, max_seq_len=128).save_pretrained(lsh)  # n_hashes 2
    _eval_model(num_tokens=256, max_seq_len=128, use_full_attn=True).save_pretrained(full)  # the same weights
    saved = (lsh / "config.json").read_text()
    bpc = {}
    for name, ckpt, flags in [("lsh-2", lsh, []), ("lsh-8", lsh, ["--n-hashes", "8"]),
                              ("lsh->full", lsh, ["--full-attention"]), ("full->lsh-2", full, ["--n-hashes", "2"]),
                              ("full", full, [])]:  # fmt: skip
        assert main(["eval", "--checkpoint", str(ckpt), "--seq-len", "128", "--batches", "1", *flags]) == 0
        out = capsys.readouterr().out
        assert ("LSH with" in out or "full attention" in out) == bool(flags)
        bpc[name] = out.split("bits/token")[0].split(",")[-1]
    assert len({bpc["lsh-2"], bpc["lsh-8"], bpc["full"]}) == 3  # three functions of the same weights
    assert bpc["lsh->full"] == bpc["full"] and bpc["full->lsh-2"] == bpc["lsh-2"]
    assert (lsh / "config.json").read_text() == saved
    code = main(["eval", "--checkpoint", str(lsh), "--n-hashes", "4", "--full-attention"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "exclude each other" in err[0]


def _results(acc):
    cfg = DuplicationConfig(trained_with=tuple(acc), evaluated_with=("full", "lsh-8", "lsh-1"))
    return {"config": asdict(cfg), "accuracy": acc}


def test_duplication_table_puts_ours_next_to_the_paper():
    acc = {
        "full": {"full": 99.25, "lsh-8": 40.0, "lsh-1": 10.0},
        "lsh-4": {"full": 1.0, "lsh-8": 98.96, "lsh-1": 80.0},
        "lsh-3": {"full": 2.0, "lsh-8": 97.0, "lsh-1": 70.0},
    }
    lines = duplication_table(_results(acc)).splitlines()
    header = next(line for line in lines if line.startswith("| trained with"))
    assert [c.strip() for c in header.split("|")[2:-1]] == ["eval full", "eval LSH-8", "eval LSH-1"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines
            if line.startswith("| ") and line is not header}  # fmt: skip
    assert rows["full"] == ["99.2 (100)", "40.0 (94.8)", "10.0 (52.5)"]
    assert rows["LSH-4"] == ["1.0 (0.8)", f"99.0 ({PAPER_TABLE2['lsh-4']['lsh-8']:g})", "80.0 (91.9)"]
    assert rows["LSH-3"] == ["2.0 (-)", "97.0 (-)", "70.0 (-)"]  # the paper has no LSH-3 row
    assert lines[-1].endswith("98.96% (not met).")
    acc["lsh-4"]["lsh-8"] = 99.0
    assert duplication_table(_results(acc)).splitlines()[-1].endswith("(met).")


def test_lm_table_gaps_to_full_attention():
    results = {
        "config": {"data": "builtin", "depth": 2, "dim": 128, "seq_len": 512, "steps": 600, "batch_size": 8},
        "curves": {"full": [[50, 3.0], [100, 2.5]], "lsh-8": [[50, 3.1], [100, 2.54]]},
        "train_seconds": {"full": 100.0, "lsh-8": 200.0},
    }
    table = lm_table(results)
    assert "| full | 2.500 | +0.000 | 100 |" in table and "| LSH-8 | 2.540 | +0.040 | 200 |" in table
    assert table.rstrip().endswith("+0.040 (not met).")
    assert "Fig. 3" not in table  # no baselines trained: no ablation lines


def test_lm_table_reports_the_fig3_pairs():
    results = {
        "config": {"data": "builtin", "depth": 2, "dim": 128, "seq_len": 512, "steps": 600, "batch_size": 8},
        "curves": {"full": [[100, 2.5]], "transformer": [[100, 2.4]], "transformer-shared-qk": [[100, 2.45]]},
        "train_seconds": {"full": 100.0, "transformer": 90.0, "transformer-shared-qk": 95.0},
    }
    table = lm_table(results)
    assert "| Transformer | 2.400 | -0.100 | 90 |" in table
    assert "* shared QK vs separate QK (standard Transformer, dense attention): 2.450 vs 2.400 (+0.050)" in table
    assert "* reversible vs standard residual stack (shared QK, dense attention): 2.500 vs 2.450 (+0.050)" in table


def test_lm_variants_build_the_models_they_name():
    cfg = LMConfig()
    transformer, shared = cfg.model_config("transformer"), cfg.model_config("transformer-shared-qk")
    assert (transformer.residual, transformer.shared_qk, transformer.layer_kinds()) == ("standard", False, ["full"] * 2)
    assert (shared.residual, shared.shared_qk) == ("standard", True)
    full, lsh = cfg.model_config("full"), cfg.model_config("lsh-4")
    assert (full.residual, full.layer_kinds(), lsh.layer_kinds(), lsh.n_hashes) == (
        "reversible",
        ["full"] * 2,
        ["lsh"] * 2,
        4,
    )
    for bad in (("full", "dense"), ("full", "full"), ()):
        with pytest.raises(ValueError, match="variant"):
            LMConfig(variants=bad)


def test_attention_labels():
    assert parse_attention("full") is None and parse_attention("lsh-16") == 16
    for bad in ("lsh-0", "lsh", "LSH-2", "dense"):
        with pytest.raises(ValueError, match="'full' or 'lsh-N'"):
            parse_attention(bad)


def _reproduce(capsys, *argv):
    code = main(["reproduce", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_reproduce_duplication_end_to_end(tmp_path, capsys):
    out = tmp_path / "dup"
    argv = ["duplication", "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1",
            "--out", str(out)]  # fmt: skip
    code, table, err = _reproduce(capsys, *argv)
    assert code == 0, err
    results = json.loads((out / "duplication.json").read_text())
    assert (out / "duplication.md").read_text() == table == duplication_table(results)
    acc = results["accuracy"]
    assert list(acc) == ["full", "lsh-4", "lsh-2", "lsh-1"]
    assert all(list(row) == ["full", "lsh-8", "lsh-4", "lsh-2", "lsh-1"] for row in acc.values())
    assert all(0 <= a <= 100 for row in acc.values() for a in row.values())
    assert results["config"]["steps"] == 2 and results["config"]["n_symbols"] == 127
    assert sorted(p.name for p in out.glob("train-*")) == ["train-full", "train-lsh-1", "train-lsh-2", "train-lsh-4"]

    code, again, _ = _reproduce(capsys, *argv)  # the trained models are reused: the same table
    assert code == 0 and again == table
    code, _, err = _reproduce(capsys, *argv[:-2], "--steps", "3", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another configuration" in err


def test_reproduce_lm_end_to_end(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "lm"
    code, table, err = _reproduce(capsys, "lm", "--data", str(text), "--steps", "2", "--eval-every", "1",
                                  "--seq-len", "32", "--batch-size", "2", "--out", str(out))  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "lm.json").read_text())
    assert list(results["curves"]) == [
        "full",
        "lsh-1",
        "lsh-2",
        "lsh-4",
        "lsh-8",
        "transformer",
        "transformer-shared-qk",
    ]
    assert all([step for step, _ in curve] == [1, 2] for curve in results["curves"].values())
    assert (out / "lm.md").read_text() == table and "Target: LSH-8" in table
    assert (out / "lm-bpc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Fig. 3 analogue" in table

    small = ["--data", str(text), "--steps", "2", "--seq-len", "32", "--batch-size", "2"]
    code, table, err = _reproduce(capsys, "lm", *small, "--variants", "full", "lsh-2", "--out", str(tmp_path / "two"))
    assert code == 0, err
    assert "| LSH-2 |" in table and "Transformer" not in table
    code, _, err = _reproduce(capsys, "lm", "--variants", "full", "dense", "--out", str(tmp_path / "bad"))
    assert code == 2 and "variant must be 'full', 'lsh-N' or one of" in err


def test_experiment_configs_validate():
    with pytest.raises(ValueError, match="even seq_len"):
        DuplicationConfig(seq_len=31)
    with pytest.raises(ValueError, match="'full' or 'lsh-N'"):
        DuplicationConfig(trained_with=("lsh-4", "dense"))
    with pytest.raises(ValueError, match="batch_size"):
        DuplicationConfig(batch_size=0)
    assert isinstance(DUPLICATION_SCALES["cpu"].model_config("lsh-4"), ReformerConfig)
