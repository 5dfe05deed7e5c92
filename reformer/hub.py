"""The Hugging Face Hub: checkpoints named by a repo id (``"org/name"``), pushed as one commit, and
the model card (``README.md``) that ``save_pretrained`` writes.

``huggingface_hub`` is an optional dependency (the ``hub`` extra); everything local works
without it. Downloads go through its cache (``HF_HOME``, ``HF_HUB_CACHE``) and honour
``HF_HUB_OFFLINE=1``; the checkpoint's own manifest then checks the files it got.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

#: The files of a checkpoint directory (checkpoint.py) that are uploaded and downloaded; ``vocab.json``
#: (the vocabulary and a classifier's label names) when the model has one (``reformer train`` writes it).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "manifest.json", "README.md", "vocab.json")
#: What is downloaded of a Hugging Face transformers Reformer (``reformer convert``).
TRANSFORMERS_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")  # fmt: skip
CARD_NAME = "README.md"
LIBRARY_NAME = "reformer-torch"

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            "loading from or pushing to the Hugging Face Hub needs huggingface_hub: pip install 'reformer-torch[hub]'"
        ) from None
    return huggingface_hub


def is_repo_id(name: str) -> bool:
    """``org/name`` (no such local path): a Hub repository."""
    return bool(_REPO_ID.match(name)) and not Path(name).exists()


def resolve(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    files: tuple[str, ...] = CHECKPOINT_FILES,
) -> Path:
    """A local checkpoint directory as given; a Hub repo id downloaded into (or found in) the Hub
    cache, the ``files`` (names or patterns) only, at ``revision`` (a branch, tag or commit;
    default main)."""
    name = os.fspath(name_or_path)
    if not is_repo_id(name):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a Hub repo id, and {name} is a local path")
        return Path(name)
    # (a mistyped local path such as runs/name gets here too: the errors say that no directory has that name)
    try:
        hub = _hub()
    except ImportError:
        raise FileNotFoundError(f"no directory {name}; as a Hugging Face Hub repo id it needs huggingface_hub: "
                                "pip install 'reformer-torch[hub]'") from None  # fmt: skip
    try:
        path = hub.snapshot_download(name, revision=revision, allow_patterns=list(files), token=token)
    except hub.errors.LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{name}{'@' + revision if revision else ''} is not in the Hugging Face cache and the Hub cannot be "
            "reached (HF_HUB_OFFLINE is set, or no network); nor is it a local directory"
        ) from None
    except hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no Hugging Face Hub repository {name} (or it is private: log in or pass token=), nor a local directory"
        ) from None
    except hub.errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{name} has no revision {revision!r}") from None
    return Path(path)


def _architecture_rows(cfg: Any, prefix: str = "", tokens: bool = True) -> list[tuple[str, str]]:
    """The card's rows of one config; ``tokens``: the model embeds token ids (a ``Reformer``
    stack takes vectors, and its config's ``num_tokens`` means nothing)."""
    return [
        (f"{prefix}width / depth / heads", f"{cfg.dim} / {cfg.depth} / {cfg.heads}"),
        (f"{prefix}attention layers", ", ".join(cfg.layer_kinds())),
        (f"{prefix}LSH hash rounds / bucket size", f"{cfg.n_hashes} / {cfg.bucket_size}"),
        (f"{prefix}causal", str(cfg.causal)),
        (f"{prefix}context (max_seq_len)", f"{cfg.max_seq_len:,}" if cfg.max_seq_len else "unbounded"),
        *([(f"{prefix}vocabulary", f"{cfg.num_tokens:,} tokens")] if tokens else []),
    ]


def model_card(model: Any, training: dict[str, Any] | None = None) -> str:
    """The ``README.md`` of a checkpoint: metadata the Hub reads (library, tags), the architecture,
    what is known of its training, and how to load it."""
    arch = type(model).__name__
    # one config, or an encoder's and a decoder's (ReformerEncDec)
    configs = {"": model.config} if hasattr(model, "config") else {"encoder ": model.encoder.config,
                                                                     "decoder ": model.decoder.config}  # fmt: skip
    rows = [("class", f"`{arch}`"), ("parameters", f"{sum(p.numel() for p in model.parameters()):,}")]
    tokens = any(name.endswith("token_emb") for name, _ in model.named_modules())
    for prefix, cfg in configs.items():
        rows += _architecture_rows(cfg, prefix, tokens)
    if hasattr(model, "classifier"):  # a sequence classifier: its head
        rows.append(("labels / pooling", f"{model.config.num_labels} / {model.config.pooling}"))
    tags = ["reformer", "lsh-attention", "pytorch"]
    if any(cfg.residual == "reversible" for cfg in configs.values()):
        tags.append("reversible")
    generates = arch == "ReformerLM" and model.config.causal and not model.config.return_embeddings
    lines = [
        "---",
        f"library_name: {LIBRARY_NAME}",
        "tags:",
        *(f"- {tag}" for tag in tags),
        *(["pipeline_tag: text-generation"] if generates else []),
        "---",
        "",
        f"# {arch}",
        "",
        f"A Reformer (Kitaev, Kaiser and Levskaya, ICLR 2020) saved by `{LIBRARY_NAME}`: `config.json`,",
        "`model.safetensors` and a `manifest.json` of the weights' SHA-256, checked when loaded.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Training",
        "",
        *([f"- {k}: {v}" for k, v in training.items()] if training else ["Not recorded with this checkpoint."]),
        "",
        "## Use",
        "",
        "```python",
        f"from reformer import {arch}",
        "",
        f'model = {arch}.from_pretrained("REPO_OR_DIRECTORY")',
        "```",
        "",
    ]
    return "\n".join(lines)


def is_our_card(path: Path) -> bool:
    """Whether ``path`` is a model card this library wrote (so it may be replaced)."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:200]
    except OSError:
        return False
    return head.startswith("---") and f"library_name: {LIBRARY_NAME}" in head


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    training: dict[str, Any] | None = None,
    api: Any = None,
) -> Any:
    """Save ``model`` (weights, config, manifest, model card) and upload it to ``repo_id`` as one
    commit, creating the repository and the branch ``revision`` if needed. Returns the Hub's
    commit info. ``api``: an ``HfApi`` (default: a new one with ``token``)."""
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"repo_id must be 'owner/name', got {repo_id!r}")
    hub = _hub()
    api = api if api is not None else hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not revision.startswith("refs/pr/"):  # a commit goes onto an existing branch only
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reformer-push-") as tmp:
        model.save_pretrained(tmp, training=training)
        operations = [
            hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(tmp) / name))
            for name in CHECKPOINT_FILES
            if (Path(tmp) / name).is_file()
        ]
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {type(model).__name__}",
            revision=revision,
        )
