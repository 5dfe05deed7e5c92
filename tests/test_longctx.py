"""The long-context study's machinery (results are not tests): the ``pysrc`` corpus (split,
metadata, one buffer), windows inside documents, per-position bits per byte and their errors,
and ``reformer reproduce longctx`` end to end at toy sizes, resumed."""

import hashlib
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import reformer.data as data
from reformer import ReformerLM, longctx
from reformer.cli import main
from reformer.data import Documents, load_corpus, load_pysrc, pysrc_files, pysrc_split_of
from reformer.longctx import (
    LongCtxConfig,
    clustered_mean,
    document_windows,
    position_losses,
    run_longctx,
    summarize,
)
from reformer.train import checkpoint_dirs, train


def _write_stdlib(root, n_files=40, seed=0, reverse=False):
    """A fake standard library: ``n_files`` .py files of 80..2000 bytes in a few folders, plus
    files that must be left out. ``reverse`` creates them in the opposite order."""
    rnd = random.Random(seed)
    files = []
    for i in range(n_files):
        words = [f"name_{rnd.randrange(30)}" for _ in range(rnd.randrange(4, 100))]
        files.append((f"pkg{i % 4}/mod{i}.py", "\n".join(f"{w} = {w}" for w in words) + "\n"))
    for rel, text in reversed(files) if reverse else files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for excluded in ("site-packages/pkg/a.py", "dist-packages/b.py", "pkg0/notes.txt"):
        (root / excluded).parent.mkdir(parents=True, exist_ok=True)
        (root / excluded).write_text("not the standard library\n")
    return dict(files)


@pytest.fixture
def stdlib(tmp_path, monkeypatch):
    root = tmp_path / "stdlib"
    files = _write_stdlib(root, n_files=160)  # about 8 validation files
    monkeypatch.setattr(data, "pysrc_root", lambda: root)
    return root, files


def test_split_is_a_deterministic_90_5_5_hash_of_the_path():
    names = [f"pkg/mod_{i}.py" for i in range(20_000)]
    splits = [pysrc_split_of(n) for n in names]
    assert splits == [pysrc_split_of(n) for n in names]
    shares = {s: splits.count(s) / len(names) for s in ("train", "valid", "test")}
    assert abs(shares["train"] - 0.90) < 0.01 and abs(shares["valid"] - 0.05) < 0.006
    assert abs(shares["test"] - 0.05) < 0.006
    assert pysrc_split_of("json/decoder.py") == pysrc_split_of("json/decoder.py")


def test_splits_are_disjoint_cover_every_file_and_ignore_listing_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = _write_stdlib(a)
    _write_stdlib(b, reverse=True)
    src_a, src_b = load_pysrc(a), load_pysrc(b)
    assert src_a.sha256 == src_b.sha256
    names = {split: docs.names for split, docs in src_a.splits.items()}
    assert names == {split: docs.names for split, docs in src_b.splits.items()}
    assert sorted(sum(names.values(), [])) == sorted(files)  # each file once; excluded dirs and .txt left out
    for split, docs in src_a.splits.items():
        assert all(pysrc_split_of(n) == split for n in docs.names)
        for i, name in enumerate(docs.names):  # each document's bytes are its file's
            assert bytes(docs.tokens[docs.offsets[i] : docs.offsets[i + 1]].tolist()) == files[name].encode()
    assert "site-packages/pkg/a.py" not in pysrc_files(a)


def test_metadata_counts_and_hashes_the_corpus_in_its_documented_order(stdlib):
    root, files = stdlib
    src = load_pysrc()
    meta = src.metadata()
    assert meta["files"] == len(files) and meta["bytes"] == sum(len(t.encode()) for t in files.values())
    assert meta["python_version"].count(".") == 2 and meta["stdlib"] == str(root)
    assert sum(s["files"] for s in meta["splits"].values()) == len(files)
    digest = hashlib.sha256()
    order = {"train": 0, "valid": 1, "test": 2}
    for rel in sorted(files, key=lambda r: (order[pysrc_split_of(r)], r)):
        raw = files[rel].encode()
        digest.update(rel.encode() + b"\0" + len(raw).to_bytes(8, "big") + raw)
    assert meta["sha256"] == digest.hexdigest()
    (root / "pkg1" / "mod1.py").write_text("changed\n")
    assert load_pysrc().sha256 != meta["sha256"]


def test_the_corpus_is_one_buffer_and_the_splits_view_it(stdlib):
    src = load_pysrc()
    storages = {d.tokens.untyped_storage().data_ptr() for d in src.splits.values()}
    assert len(storages) == 1  # every split is a view of one storage ...
    total = src.metadata()["bytes"]
    assert src.splits["train"].tokens.untyped_storage().nbytes() == total  # ... holding the corpus once
    assert all(d.tokens.dtype == torch.uint8 for d in src.splits.values())
    corpus = load_corpus("pysrc")
    assert corpus.name == "pysrc" and corpus.train.dtype == torch.uint8
    assert corpus.train.untyped_storage().data_ptr() == corpus.valid.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="byte-level"):
        load_corpus("pysrc", vocab="char")


def test_document_windows_lie_inside_documents_without_overlap():
    offsets = torch.tensor([0, 30, 40, 140, 150])  # lengths 30, 10, 100, 10
    docs = Documents(torch.zeros(150, dtype=torch.uint8), offsets, ["a", "b", "c", "d"])
    starts, owners = document_windows(docs, seq_len=9, max_windows=100)  # windows of 10
    assert starts.tolist() == [0, 10, 20, 30, *range(40, 140, 10), 140]
    assert owners.tolist() == [0, 0, 0, 1, *[2] * 10, 3]
    starts, owners = document_windows(docs, seq_len=29, max_windows=3)  # windows of 30: a once, c three times
    assert starts.tolist() == [0, 40, 70] and owners.tolist() == [0, 2, 2]  # 3 of 4, spread evenly
    with pytest.raises(ValueError, match="no validation document"):
        document_windows(docs, seq_len=100, max_windows=5)


def test_position_losses_equal_a_direct_computation(tiny_lm):
    torch.manual_seed(0)
    model = tiny_lm(dim=16, max_seq_len=32)
    tokens = torch.randint(0, 256, (200,), dtype=torch.uint8)
    starts = torch.tensor([0, 33, 100, 150])
    losses = position_losses(model, tokens, starts, seq_len=32, batch_size=3)  # two batches
    assert losses.shape == (4, 32)
    model.eval()
    for w, s in enumerate(starts.tolist()):
        window = tokens[s : s + 33].long()
        logp = F.log_softmax(model(window[None, :-1])[0], dim=-1)  # (32, 256)
        direct = -logp[torch.arange(32), window[1:]] / math.log(2)
        torch.testing.assert_close(losses[w], direct, atol=1e-5, rtol=1e-5)
    result = summarize(losses, torch.tensor([0, 0, 1, 2]), [(0, 8), (8, 32)])
    assert result["bpb"] == pytest.approx(losses.mean().item(), rel=1e-6)
    assert result["by_position"][1][0] == pytest.approx(losses[:, 8:].mean().item(), rel=1e-6)
    assert result["windows_by_position"][2][0] == pytest.approx(losses[2, :8].mean().item(), abs=1e-5)


def test_clustered_standard_error():
    x = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, se = clustered_mean(x, torch.arange(4))  # one window per document: the plain error
    assert mean == pytest.approx(3.5) and se == pytest.approx(float(x.std() / 2))
    mean, se = clustered_mean(x, torch.tensor([0, 0, 1, 1]))  # two documents: sums of deviations -4 and 4
    assert se == pytest.approx(math.sqrt((16 + 16) / 16 * 2))
    assert clustered_mean(x, torch.zeros(4, dtype=torch.long))[1] == 0.0


TOY = dict(seq_len=64, steps=2, batch_size=2, warmup_steps=1, eval_every=1, eval_batches=1, eval_windows=12, dim=16,
           depth=1, heads=2, bucket_size=8, local_window=16, position_edges=(8, 16, 32), eval_rounds=(2,),
           models=("transformer", "full", "lsh-1", "local"))  # fmt: skip


@pytest.mark.parametrize("depth", [1, 3])
def test_the_local_models_reach_is_its_block_and_one_before_per_layer(depth):
    """docs/long-context.md: each layer of ``local`` sees its own block of ``local_window`` bytes and
    the one before, so after ``depth`` layers position ``p`` depends on bytes back to the start of
    the block ``depth`` blocks before its own: ``depth * W`` to ``depth * W + W - 1`` bytes back."""
    cfg = LongCtxConfig(**{**TOY, "depth": depth})
    window = cfg.local_window
    torch.manual_seed(0)
    model = ReformerLM(config=cfg.model_config("local")).eval()
    x = torch.randint(0, 256, (1, cfg.seq_len))
    with torch.no_grad():
        base = model(x)
        for j in (3, 17, 40):
            changed = x.clone()
            changed[0, j] = (x[0, j] + 1) % 256
            moved = ((model(changed) - base).abs().amax(dim=-1)[0] > 1e-6).nonzero().flatten().tolist()
            reach = [p for p in range(cfg.seq_len) if j <= p and (p // window - depth) * window <= j]
            assert moved == reach, (j, moved)


def test_config_builds_the_models_it_names_with_equal_sizes():
    cfg = LongCtxConfig(**TOY)
    configs = {label: cfg.model_config(label) for label in cfg.models}
    assert configs["transformer"].residual == "standard" and not configs["transformer"].shared_qk
    assert configs["full"].use_full_attn and configs["full"].residual == "reversible"
    assert configs["lsh-1"].layer_kinds() == ["lsh"] and configs["lsh-1"].n_hashes == 1
    assert configs["local"].layer_kinds() == ["local"] and configs["local"].chunk_length("local") == 16
    assert len({(c.dim, c.depth, c.heads, c.max_seq_len, c.axial_position_shape) for c in configs.values()}) == 1
    assert cfg.buckets() == [(0, 8), (8, 16), (16, 32), (32, 64)]
    assert longctx.eval_settings(cfg, "lsh-1") == ["trained", "lsh-2", "full"]
    bad_configs = [
        (dict(models=("lsh-0",)), "model must be"), (dict(position_edges=(8, 80)), "position_edges"),
        (dict(local_window=15), "local_window"), (dict(models=("full", "full")), "repeats"),
    ]  # fmt: skip
    for bad, match in bad_configs:
        with pytest.raises(ValueError, match=match):
            LongCtxConfig(**{**TOY, **bad})


def test_the_step_probe_measures_memory_and_time_in_a_fresh_process():
    cfg = LongCtxConfig(**TOY)
    probe = longctx.step_probe(cfg.model_config("full"), 2, "cpu")
    assert probe["peak_bytes"] > 64 * 64 * 4  # at least one score matrix
    assert 0 < probe["seconds_per_step"] < 60


def test_longctx_runs_subsets_resumes_and_reports_every_finished_model(stdlib, tmp_path, monkeypatch):
    probe = {"peak_bytes": 1234, "seconds_per_step": 0.5}
    monkeypatch.setattr(longctx, "step_probe", lambda config, batch, device: probe)  # tested above
    cfg, out = LongCtxConfig(**TOY), tmp_path / "study"
    first = run_longctx(cfg, out, only=("full",))
    assert list(first["models"]) == ["full"] and first["not_yet_run"] == ["transformer", "lsh-1", "local"]
    assert first["corpus"]["sha256"] == load_pysrc().sha256
    # lsh-1 interrupted after one of its two steps, as a killed session would leave it
    torch.manual_seed(cfg.seed)
    partial = ReformerLM(config=cfg.model_config("lsh-1"))
    corpus = load_corpus("pysrc")
    train(partial, corpus.train, corpus.valid, cfg.train_config(), out / "train-lsh-1", stop_after=1)
    full_ckpt = checkpoint_dirs(out / "train-full")[-1]
    mtime = (full_ckpt / "trainer.pt").stat().st_mtime_ns
    results = run_longctx(cfg, out, only=("lsh-1", "local"))
    assert set(results["models"]) == {"full", "lsh-1", "local"} and results["not_yet_run"] == ["transformer"]
    assert (full_ckpt / "trainer.pt").stat().st_mtime_ns == mtime  # full was neither retrained nor re-saved
    lsh = results["models"]["lsh-1"]
    assert [p[0] for p in lsh["curve"]] == [1, 2]  # resumed at step 1: each step once
    assert set(lsh) >= {"trained", "lsh-2", "full", "peak_step_bytes", "seconds_per_step", "probe_seconds_per_step"}
    assert lsh["peak_step_bytes"] == 1234 and lsh["probe_seconds_per_step"] == 0.5
    assert lsh["n_windows"] == len(lsh["trained"]["windows"]) <= 12
    assert len(lsh["trained"]["by_position"]) == 4
    assert results["models"]["full"] == first["models"]["full"]  # cached evaluation reused
    written = json.loads((out / "longctx.json").read_text())
    assert written["models"].keys() == results["models"].keys()
    table = (out / "longctx.md").read_text()
    assert "Not yet run: transformer" in table and "| lsh-1 | full |" in table
    for name in longctx.PUBLISHED:
        assert (out / name).stat().st_size > 0
    with pytest.raises(ValueError, match="another configuration"):
        run_longctx(LongCtxConfig(**{**TOY, "steps": 3}), out, only=("full",))
    with pytest.raises(ValueError, match="not in this study"):
        run_longctx(LongCtxConfig(**{**TOY, "models": ("full",)}), tmp_path / "other", only=("lsh-1",))


def test_reproduce_longctx_cli_end_to_end(stdlib, tmp_path, monkeypatch, capsys):
    probe = {"peak_bytes": 1234, "seconds_per_step": 0.5}
    monkeypatch.setattr(longctx, "step_probe", lambda config, batch, device: probe)
    monkeypatch.setitem(longctx.LONGCTX_SCALES, "pilot", LongCtxConfig(**TOY))
    out, docs = tmp_path / "study", tmp_path / "docs"
    argv = ["reproduce", "longctx", "--scale", "pilot", "--models", "transformer", "--out", str(out),
            "--eval-windows", "4", "--publish", str(docs)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| transformer | trained |" in printed
    stored = json.loads((docs / "longctx.json").read_text())
    assert stored["config"]["eval_windows"] == 4 and list(stored["models"]) == ["transformer"]
    # the command that reproduces the whole study: every option but --models
    command = f"reformer reproduce longctx --scale pilot --eval-windows 4 --out {out} --publish {docs}"
    assert stored["command"] == command and f"Command: `{command}`" in (docs / "longctx.md").read_text()
    assert main(["reproduce", "longctx", "--long", "--seq-len", "64", "--out", str(tmp_path / "x")]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_long_flag_sets_a_16k_context_with_its_position_buckets(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(longctx, "run_longctx", lambda cfg, *a, **k: seen.append(cfg) or {"never": "printed"})
    monkeypatch.setattr(longctx, "longctx_table", lambda results: "")
    assert main(["reproduce", "longctx", "--long", "--steps", "5", "--out", str(tmp_path / "x")]) == 0
    assert seen[0].seq_len == 16_384 and seen[0].steps == 5 and seen[0].dim == LongCtxConfig().dim
    assert seen[0].buckets()[-3:] == [(2048, 4096), (4096, 8192), (8192, 16_384)]
