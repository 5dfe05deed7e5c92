"""Training beyond next-token prediction: labelled documents (file formats, label order, split),
a classifier that learns and resumes exactly, masked-token training, and the CLI's
``--task classify`` / ``--objective mlm`` with ``eval``'s accuracy."""

import csv
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from reformer import ReformerConfig, ReformerLM
from reformer.cli import main
from reformer.data import WindowSampler
from reformer.heads import ReformerForMaskedLM, ReformerForSequenceClassification
from reformer.labelled import ExampleSampler, load_labelled, read_label_folders, read_tsv
from reformer.train import MaskedLM, TrainConfig, evaluate, objective_for, train

SMALL = dict(dim=32, depth=1, heads=2, bucket_size=8, n_hashes=1, max_seq_len=16, causal=False, pooling="mean")


def write_tsv(path, n=120, seed=0):
    """A trivially separable task: documents of 'a's are 'pos', of 'b's 'neg'."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        length = int(torch.randint(3, 14, (1,), generator=g))
        lines.append(f"{label}\t{('a' if label == 'pos' else 'b') * length} {i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tsv_lines_parse_and_a_bad_line_is_named_with_its_file_and_line(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_bytes(b"spam\tbuy now\tcheap\r\n\n ham \thello there\n")
    assert read_tsv(good) == [("spam", "buy now\tcheap"), ("ham", "hello there")]  # the text keeps later tabs
    good.write_bytes(b"\xef\xbb\xbfspam\tx\nspam\ty\n")  # a byte-order mark (Windows editors) is not in the label
    assert read_tsv(good) == [("spam", "x"), ("spam", "y")]
    for content, problem in [(b"a\tx\n\nno tab here\n", "3: expected 'label<TAB>text', found no tab"),
                             (b"a\tx\n\tno label\n", "2: empty label"), (b"a\t\n", "1: empty text"),
                             (b"a\tx\nb\t\xff\n", "2: not UTF-8")]:  # fmt: skip
        bad = tmp_path / "bad.tsv"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"^{bad}:{problem}"):
            read_tsv(bad)


def test_a_folder_per_label_parses_and_misplaced_or_empty_files_are_named(tmp_path):
    root = tmp_path / "docs"
    for label, name, text in [("sport", "a.txt", "goal"), ("sport", "deep/b.txt", "match"), ("art", "c.txt", "oil")]:
        (root / label / name).parent.mkdir(parents=True, exist_ok=True)
        (root / label / name).write_text(text)
    (root / "art" / ".hidden").write_text("skipped")
    assert sorted(read_label_folders(root)) == [("art", "oil"), ("sport", "goal"), ("sport", "match")]
    (root / "stray.txt").write_text("x")
    with pytest.raises(ValueError, match="stray.txt: a document must be in a sub-folder named after its label"):
        read_label_folders(root)
    (root / "stray.txt").unlink()
    (root / "art" / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt: empty document"):
        read_label_folders(root)
    (root / "art" / "empty.txt").unlink()
    (root / "music").mkdir()  # a label folder without documents: refused, not a class left out
    with pytest.raises(ValueError, match="music: a label folder without documents"):
        read_label_folders(root)


def test_label_ids_and_the_split_do_not_depend_on_line_order(tmp_path):
    first = write_tsv(tmp_path / "a.tsv")
    shuffled = tmp_path / "b.tsv"
    lines = first.read_text().splitlines()
    shuffled.write_text("\n".join(reversed(lines)) + "\n")
    a, b = load_labelled(str(first), "byte", 16), load_labelled(str(shuffled), "byte", 16)
    assert a.labels == b.labels == ("neg", "pos")  # sorted by name
    assert 0 < len(a.valid) < len(a.train) and len(a.valid) + len(a.train) == 120
    key = lambda s: sorted(zip(s.ids.tolist(), s.labels.tolist(), strict=True))  # noqa: E731
    assert key(a.train) == key(b.train) and key(a.valid) == key(b.valid)
    # a model's own order fixes the ids; a label it does not know is refused
    flipped = load_labelled(str(first), "byte", 16, labels=("pos", "neg", "other"))
    assert torch.equal(flipped.train.labels, 1 - a.train.labels)
    with pytest.raises(ValueError, match=r"labels \['pos'\] are not among the model's"):
        load_labelled(str(first), "byte", 16, labels=("neg", "other"))


def test_long_documents_are_truncated_and_padding_is_masked(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("".join(f"{'x' if i % 2 else 'y'}\t{'z' * (i + 1)}\n" for i in range(60)))
    data = load_labelled(str(path), "byte", 8).train
    assert data.ids.shape[1] == 8 and data.lengths.max() == 8 and data.lengths.min() < 8
    ids, mask, _ = ExampleSampler(data, 5, evaluation=True).next_batch()
    assert torch.equal(mask.sum(1), data.lengths[:5]) and torch.all(ids[~mask] == 0)


def test_listops_data_has_ten_labels_and_fits_seq_len():
    data = load_labelled("listops:40", "byte", 64)
    assert data.labels == tuple("0123456789") and (len(data.train), len(data.valid)) == (40, 4)
    assert data.train.lengths.max() <= 64 and data.train.lengths.min() > 64 // 4
    with pytest.raises(ValueError, match="listops:N with N >= 10"):
        load_labelled("listops:x", "byte", 64)


def _classifier():
    torch.manual_seed(0)
    return ReformerForSequenceClassification(num_tokens=256, num_labels=2, **SMALL)


def _cfg(**kw):
    base = dict(steps=30, batch_size=8, seq_len=16, lr=3e-3, warmup_steps=3, eval_every=10, eval_batches=2,
                save_every=10, keep_last=1, objective="classify")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_a_tiny_classifier_learns_a_separable_task(tmp_path):
    data = load_labelled(str(write_tsv(tmp_path / "d.tsv")), "byte", 16)
    state = train(_classifier(), data.train, data.valid, _cfg(steps=20), tmp_path / "run")
    evals = [r for r in state.history if "eval_accuracy" in r]
    assert len(evals) == 2 and evals[-1]["eval_accuracy"] >= 0.9  # chance is 0.5
    assert evals[-1]["eval_loss"] < 0.5 < state.history[0]["loss"]


def test_a_resumed_classify_run_equals_an_uninterrupted_one(tmp_path):
    data = load_labelled(str(write_tsv(tmp_path / "d.tsv")), "byte", 16)
    cfg = _cfg(steps=6, eval_every=3)
    straight = train(_classifier(), data.train, data.valid, cfg, tmp_path / "a")
    first = train(_classifier(), data.train, data.valid, cfg, tmp_path / "b", stop_after=4)
    assert first.step == 4
    resumed = train(_classifier(), data.train, data.valid, cfg, tmp_path / "b", resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert resumed.history[-1]["eval_accuracy"] == straight.history[-1]["eval_accuracy"]


def test_evaluation_scores_each_validation_document_once(tmp_path):
    """7 documents in batches of 3: the third batch repeats two to fill it, unscored, so the
    accuracy and loss are those of the 7 documents, not of 9."""
    data = load_labelled(str(write_tsv(tmp_path / "d.tsv")), "byte", 16).train
    valid = type(data)(data.ids[:7], data.lengths[:7], data.labels[:7])
    sampler = ExampleSampler(valid, 3, evaluation=True)
    labels = torch.cat([sampler.next_batch()[2] for _ in range(3)])
    assert torch.equal(labels, torch.cat([valid.labels, torch.tensor([-100, -100])]))
    model = _classifier().eval()
    with torch.no_grad():
        logits = model(*valid.rows(torch.arange(7))[:2])  # (7, 2) every document once
    expected_accuracy = (logits.argmax(-1) == valid.labels).float().mean().item()
    expected_loss = F.cross_entropy(logits, valid.labels).item()
    scores = evaluate(model, valid, _cfg(batch_size=3, eval_batches=3))
    assert scores["eval_accuracy"] == pytest.approx(expected_accuracy, abs=1e-6)
    assert scores["eval_loss"] == pytest.approx(expected_loss, abs=1e-5)


def test_the_masked_lm_loss_counts_the_masked_positions_only():
    torch.manual_seed(0)
    config = ReformerConfig(num_tokens=257, **{**SMALL, "max_seq_len": 64})
    model = ReformerForMaskedLM(config=config)
    cfg = TrainConfig(batch_size=4, seq_len=64, objective="mlm")
    objective = objective_for(cfg, config)
    assert isinstance(objective, MaskedLM)
    stream = torch.randint(0, 256, (1000,))
    inputs, labels = objective.sampler(stream, cfg, seed=0).next_batch()  # (4, 64) each
    window = WindowSampler(stream, 64, 4, seed=0).next_batch()[:, :-1]  # the same windows, uncorrupted
    chosen = labels != -100
    assert 0 < chosen.sum() < chosen.numel() // 2
    assert torch.equal(labels[chosen], window[chosen]) and torch.equal(inputs[~chosen], window[~chosen])
    assert (inputs == 256).any() and torch.all(chosen[inputs == 256])  # the mask token (256) only where chosen
    torch.manual_seed(1)  # the same hash rotations for both passes
    loss = objective.loss(model, (inputs, labels), "fp32")
    torch.manual_seed(1)
    logits = model(inputs)  # (4, 64, 257)
    torch.testing.assert_close(loss, F.cross_entropy(logits[chosen], labels[chosen]))
    # what stands at the other positions does not count
    other = torch.where(chosen, labels, (labels + 1) % 256)
    assert not torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), other.flatten()))


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--eval-every", "5", "--save-every", "5"]


def test_cli_classify_saves_its_labels_and_eval_reports_accuracy(tmp_path, capsys):
    data, run = write_tsv(tmp_path / "d.tsv"), tmp_path / "run"
    code, out, err = _run(capsys, "train", "--task", "classify", "--data", str(data), *FAST, "--steps", "5",
                          "--out", str(run))  # fmt: skip
    assert code == 0, err
    assert "validation accuracy" in out
    ckpt = run / "checkpoints" / "step-0000005"
    assert json.loads((ckpt / "vocab.json").read_text()) == {"kind": "byte", "labels": ["neg", "pos"]}
    assert json.loads((ckpt / "config.json").read_text())["architecture"] == "ReformerForSequenceClassification"
    assert "\n- data: d.tsv\n" in (ckpt / "README.md").read_text()  # the model card names the training data
    with open(run / "log.csv") as f:
        logged = [row for row in csv.DictReader(f) if row["eval_accuracy"]][-1]
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run))
    assert code == 0 and f"validation accuracy {float(logged['eval_accuracy']):.2%}" in out, out
    code, out, _ = _run(capsys, "info", str(run))
    assert code == 0 and json.loads(out)["vocabulary"] == {"kind": "byte", "labels": ["neg", "pos"]}
    assert "not comparable" not in out
    # without the run's state (as downloaded from the Hub), at another batch size: still each validation document once
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("trainer.pt"))
    n_valid = len(load_labelled(str(data), "byte", 32).valid)
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(bare), "--data", str(data), "--batch-size", "2")
    assert code == 0 and f"accuracy {float(logged['eval_accuracy']):.2%}" in out, out
    assert f"({-(-n_valid // 2)} x 2 documents" in out, out
    # a resume with another task is another run; --objective belongs to --task lm
    code, _, err = _run(capsys, "train", "--data", str(data), *FAST, "--steps", "9", "--out", str(run), "--resume")
    assert code == 2 and "--task/--objective causal (run: classify)" in err
    code, _, err = _run(capsys, "train", "--task", "classify", "--objective", "mlm", "--data", str(data), *FAST,
                        "--out", str(tmp_path / "other"))  # fmt: skip
    assert code == 2 and "--objective applies to --task lm" in err and not (tmp_path / "other").exists()


def test_cli_bad_documents_are_one_line_errors_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("pos\tfine\nneg fine too\n")
    code, _, err = _run(capsys, "train", "--task", "classify", "--data", str(bad), *FAST, "--out", str(tmp_path / "r"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"{bad}:2: expected 'label<TAB>text'" in lines[0]
    assert not (tmp_path / "r" / "checkpoints").exists()
    # no --data: the default (builtin) is a language model's corpus, and the error says what a classifier reads
    code, _, err = _run(capsys, "train", "--task", "classify", *FAST, "--out", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1 and "--data builtin: no such file or folder" in err
    assert "listops[:N]" in err


def test_cli_masked_lm_trains_and_eval_reports_masked_token_accuracy(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--objective", "mlm", *FAST, "--batch-size", "2", "--steps", "2",
                          "--eval-every", "2", "--out", str(run))  # fmt: skip
    assert code == 0 and "validation accuracy" in out, err
    config = json.loads((run / "checkpoints" / "step-0000002" / "config.json").read_text())
    assert config["architecture"] == "ReformerForMaskedLM" and config["num_tokens"] == 257 and not config["causal"]
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run))
    assert code == 0 and "validation masked-token accuracy" in out
    # resumed as a classifier: another run, said before what a classifier's checkpoint would hold
    code, _, err = _run(capsys, "train", "--task", "classify", "--data", str(write_tsv(tmp_path / "d.tsv")), *FAST,
                        "--batch-size", "2", "--steps", "2", "--out", str(run), "--resume")  # fmt: skip
    assert code == 2 and "is another run: " in err and "--task/--objective classify (run: mlm)" in err, err
    code, _, err = _run(capsys, "generate", "--checkpoint", str(run), "--prompt", "a")
    assert code == 2 and "does not generate" in err


def test_init_from_copies_every_shared_tensor_and_the_common_token_rows(tmp_path):
    """A classifier, a causal LM and a masked LM started from one another's checkpoints: the tensors
    both have are equal afterwards, token-indexed ones on the rows both have (the masked LM's extra
    row is its mask token); a head the task adds keeps its initialisation."""
    torch.manual_seed(0)
    mlm = ReformerForMaskedLM(config=ReformerConfig(num_tokens=257, **SMALL))
    mlm.save_pretrained(tmp_path / "mlm")
    clf_config = ReformerConfig(num_tokens=256, num_labels=3, **SMALL)
    clf = ReformerForSequenceClassification(config=clf_config)
    head = {k: v.clone() for k, v in clf.state_dict().items() if k.startswith("classifier.")}
    done = clf.init_from(tmp_path / "mlm")
    assert sorted(done.new) == sorted(head) and sorted(done.unused) == ["to_logits.bias", "to_logits.weight"]
    theirs, ours = mlm.state_dict(), clf.state_dict()
    for name in done.copied:
        source = theirs[name][: len(ours[name])] if ours[name].dim() else theirs[name]
        assert torch.equal(ours[name], source), name
    assert all(torch.equal(ours[k], v) for k, v in head.items())
    assert "new: classifier.dense.weight" in done.summary()

    causal = ReformerLM(config=ReformerConfig(**{**SMALL, "causal": True, "num_tokens": 256}))
    assert not causal.init_from(tmp_path / "mlm").new  # everything, the output layer's 256 rows too
    assert torch.equal(causal.to_logits.weight, mlm.to_logits.weight[:256])
    causal.save_pretrained(tmp_path / "lm")
    again = ReformerForMaskedLM(config=ReformerConfig(num_tokens=257, **SMALL))
    mask_row = again.token_emb.weight[256].clone()
    again.init_from(tmp_path / "lm")
    assert torch.equal(again.token_emb.weight[:256], causal.token_emb.weight)
    assert torch.equal(again.token_emb.weight[256], mask_row)  # the mask token: not in a causal LM


def test_cli_init_from_a_masked_lm_trains_a_classifier_on_its_weights(tmp_path, capsys):
    data, mlm, clf = write_tsv(tmp_path / "d.tsv"), tmp_path / "mlm", tmp_path / "clf"
    sizes = ["--seq-len", "32", "--batch-size", "8", "--eval-every", "2", "--save-every", "2", "--steps", "2"]
    code, _, err = _run(capsys, "train", "--objective", "mlm", "--preset", "tiny", *sizes, "--out", str(mlm))
    assert code == 0, err
    tuned = ["train", "--task", "classify", "--data", str(data), "--init-from", str(mlm), *sizes, "--out", str(clf)]
    code, _, err = _run(capsys, *tuned, "--lr", "1e-9")  # (weights that barely move: compare with the source)
    assert code == 0, err
    assert f"initialised from {mlm / 'checkpoints' / 'step-0000002'}: " in err and "new: classifier." in err
    source = ReformerForMaskedLM.from_pretrained(mlm / "checkpoints" / "step-0000002")
    tuned_model = ReformerForSequenceClassification.from_pretrained(clf / "checkpoints" / "step-0000002")
    assert tuned_model.config.num_tokens == 256 and tuned_model.config.num_labels == 2
    assert torch.allclose(tuned_model.token_emb.weight, source.token_emb.weight[:256], atol=1e-6)
    assert json.loads((clf / "run.json").read_text())["settings"]["init_from"] == str(mlm.resolve())
    # resumed with the same flags; without --init-from it is another run
    code, _, err = _run(capsys, *tuned, "--lr", "1e-9", "--steps", "4", "--resume", "--allow-change")
    assert code == 0, err
    code, _, err = _run(capsys, "train", "--task", "classify", "--data", str(data), *sizes, "--steps", "6",
                        "--out", str(clf), "--resume", "--allow-change")  # fmt: skip
    assert code == 2 and f"--init-from None (run: {mlm.resolve()})" in err
    # the checkpoint fixes the model and the vocabulary; data with another vocabulary is refused
    for extra, match in [(["--preset", "tiny"], "--preset and --init-from"), (["--vocab", "char"], "--vocab and")]:
        code, _, err = _run(capsys, *tuned, *extra, "--out", str(tmp_path / "x"))
        assert code == 2 and match in err and not (tmp_path / "x").exists()
    from reformer import ReformerEncDec

    ReformerEncDec(dim=32, enc_num_tokens=256, enc_depth=1, enc_max_seq_len=64, dec_num_tokens=256, dec_depth=1,
                   dec_max_seq_len=64, bucket_size=8).save_pretrained(tmp_path / "encdec")  # fmt: skip
    code, _, err = _run(capsys, "train", "--init-from", str(tmp_path / "encdec"), *sizes, "--out", str(tmp_path / "z"))
    assert code == 2 and "holds a ReformerEncDec; a run starts from a checkpoint of ReformerForMaskedLM" in err
    code, _, err = _run(capsys, "train", "--task", "classify", "--data", "listops:40", "--init-from", str(mlm),
                        *sizes, "--out", str(tmp_path / "y"))  # fmt: skip
    assert code == 2 and "has its own vocabulary (word)" in err and not (tmp_path / "y").exists()
