"""The ListOps generator (Long Range Arena's task): lengths, depth, arguments and values checked
against an independent stack evaluator of the token string."""

import json
import statistics

import pytest
import torch

from reformer.data import (
    LISTOPS_END,
    LISTOPS_OPERATORS,
    LISTOPS_PAD,
    LISTOPS_VOCAB,
    ListOpsSpec,
    listops_examples,
    listops_tensors,
)

SMALL = ListOpsSpec(max_depth=6, max_args=5, min_length=20, max_length=120)


def evaluate(text: str) -> tuple[int, int, int]:
    """(value, depth, most arguments of one operator) of a token string, by a stack machine."""
    stack: list[tuple[str, list[int]]] = []
    depth = widest = 0
    result = None
    for token in text.split():
        if token in LISTOPS_OPERATORS:
            stack.append((token, []))
            depth = max(depth, len(stack))
            continue
        if token == LISTOPS_END:
            operator, args = stack.pop()
            widest = max(widest, len(args))
            value = {
                "[MIN": min,
                "[MAX": max,
                "[MED": lambda a: int(statistics.median(a)),
                "[SM": lambda a: sum(a) % 10,
            }[operator](args)
        else:
            value = int(token)
        if stack:
            stack[-1][1].append(value)
        else:
            assert result is None, "more than one expression"
            result = value
    assert not stack and result is not None, "unbalanced expression"
    return result, depth, widest


@pytest.mark.parametrize("spec", [SMALL, ListOpsSpec()], ids=["small", "lra"])
def test_examples_follow_the_spec_and_their_labels_are_their_values(spec):
    examples = listops_examples(60 if spec is SMALL else 12, seed=3, spec=spec)
    assert len({text for text, _ in examples}) == len(examples)
    for text, label in examples:
        assert spec.min_length < len(text.split()) < spec.max_length
        value, depth, widest = evaluate(text)
        assert label == value
        # the deepest digits sit one level below the deepest operator: operators reach max_depth - 1
        assert 1 <= depth < spec.max_depth
        assert 2 <= widest <= spec.max_args


def test_generation_is_seeded():
    assert listops_examples(10, seed=1, spec=SMALL) == listops_examples(10, seed=1, spec=SMALL)
    assert listops_examples(10, seed=1, spec=SMALL) != listops_examples(10, seed=2, spec=SMALL)


def test_every_class_and_operator_occurs():
    examples = listops_examples(300, seed=0, spec=SMALL)
    assert {label for _, label in examples} == set(range(10))
    roots = {text.split()[0] for text, _ in examples}
    assert roots == set(LISTOPS_OPERATORS)


def test_tensors_pad_on_the_right_and_round_trip():
    examples = listops_examples(5, seed=0, spec=SMALL)
    ids, labels = listops_tensors(examples, seq_len=SMALL.max_length)
    assert ids.shape == (5, SMALL.max_length) and labels.tolist() == [label for _, label in examples]
    for row, (text, _) in zip(ids, examples, strict=True):
        n = len(text.split())
        assert " ".join(LISTOPS_VOCAB[i] for i in row[:n].tolist()) == text
        assert torch.all(row[n:] == LISTOPS_PAD)
    with pytest.raises(ValueError, match="seq_len"):
        listops_tensors(examples, seq_len=10)


@pytest.mark.parametrize(
    "spec", [ListOpsSpec(max_args=1), ListOpsSpec(operator_p=0.0), ListOpsSpec(min_length=50, max_length=50)]
)
def test_impossible_specs_are_refused(spec):
    with pytest.raises(ValueError, match="cannot generate"):
        listops_examples(1, spec=spec)


def test_the_listops_study_publishes_resumable_results(tmp_path):
    from reformer.listops import ListOpsConfig, publish, run_listops

    cfg = ListOpsConfig(seq_len=32, n_train=40, steps=2, warmup_steps=1, eval_every=1, batch_size=4, dim=16, depth=1,
                        heads=2, bucket_size=8, n_hashes=1)  # fmt: skip
    out = tmp_path / "study"
    first = run_listops(cfg, out, only=("lsh",))
    assert list(first["models"]) == ["lsh"] and first["not_yet_run"] == ["local", "transformer"]
    lsh = first["models"]["lsh"]
    assert [step for step, _ in lsh["curve"]] == [1, 2] and 0 <= lsh["accuracy"] <= 100
    assert 0 < first["majority_class"] < 100
    results = run_listops(cfg, out)  # the finished model is kept, the others trained
    assert results["models"]["lsh"] == lsh and set(results["models"]) == {"lsh", "local", "transformer"}
    table = (out / "listops.md").read_text()
    assert "| lsh |" in table and "37.27" in table and "36.37" in table and "| chance | 10.00 |" in table
    assert json.loads((out / "listops.json").read_text())["models"]["local"]["parameters"] > 0
    publish(out, tmp_path / "docs")
    assert (tmp_path / "docs" / "listops-curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="another configuration"):
        run_listops(ListOpsConfig(**{**cfg.__dict__, "steps": 3}), out)


def test_reproduce_listops_cli_records_the_command_that_reproduces_the_study(tmp_path, monkeypatch, capsys):
    from reformer import listops
    from reformer.cli import main

    tiny = listops.ListOpsConfig(seq_len=32, n_train=40, steps=2, warmup_steps=1, eval_every=1, batch_size=4, dim=16,
                                 depth=1, heads=2, bucket_size=8, n_hashes=1)  # fmt: skip
    monkeypatch.setitem(listops.LISTOPS_SCALES, "pilot", tiny)
    out, docs = tmp_path / "study", tmp_path / "docs"
    argv = ["reproduce", "listops", "--scale", "pilot", "--models", "local", "--seed", "3", "--out", str(out),
            "--publish", str(docs)]  # fmt: skip
    assert main(argv) == 0
    assert "| local |" in capsys.readouterr().out
    stored = json.loads((docs / "listops.json").read_text())
    command = f"reformer reproduce listops --scale pilot --seed 3 --out {out} --publish {docs}"
    assert stored["command"] == command and stored["config"]["seed"] == 3 and list(stored["models"]) == ["local"]
    assert f"Command: `{command}`" in (docs / "listops.md").read_text()


def test_the_local_models_reach_is_its_block_and_the_blocks_on_either_side():
    """docs/listops.md: blocks of 2 x bucket_size tokens, bidirectional, each seeing its own block and
    the blocks before and after it. One layer: a token changes exactly the outputs of its block's
    neighbourhood."""
    from dataclasses import replace

    from reformer.heads import ReformerForSequenceClassification
    from reformer.listops import ListOpsConfig

    cfg = ListOpsConfig(seq_len=64, bucket_size=8, depth=1)
    torch.manual_seed(0)
    model = ReformerForSequenceClassification(config=replace(cfg.model_config("local"), depth=1)).eval()
    x = torch.randint(1, len(LISTOPS_VOCAB), (1, 64))
    changed = x.clone()
    changed[0, 35] = 1 + (x[0, 35] % (len(LISTOPS_VOCAB) - 1))  # position 35: block 2 of 16-token blocks
    with torch.no_grad():
        moved = (model.hidden(x) - model.hidden(changed)).abs().amax(dim=-1)[0] > 1e-6  # (64,)
    assert moved.nonzero().flatten().tolist() == list(range(16, 64))  # blocks 1, 2 and 3 (its neighbours)
