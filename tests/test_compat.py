"""Drop-in compatibility with ``reformer_pytorch`` 1.4.4: every constructor and method parameter
of its public classes is accepted here, checked against the peer's live signatures (``make test``
installs it, the ``compat`` extra) and against a committed snapshot of them, which the live check
keeps equal. Regenerate the snapshot with ``python tests/test_compat.py`` after a deliberate change.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

import pytest

import reformer
from reformer.config import PEER_ALIASES, ReformerConfig

SNAPSHOT = Path(__file__).parent / "peer" / "signatures.json"

#: Public classes of reformer_pytorch 1.4.4: (its module, our module) - the module paths match.
CLASSES = {
    "LSHAttention": ("reformer_pytorch.reformer_pytorch", "reformer.reformer_pytorch"),
    "FullQKAttention": ("reformer_pytorch.reformer_pytorch", "reformer.reformer_pytorch"),
    "LSHSelfAttention": ("reformer_pytorch.reformer_pytorch", "reformer.reformer_pytorch"),
    "Reformer": ("reformer_pytorch.reformer_pytorch", "reformer.reformer_pytorch"),
    "ReformerLM": ("reformer_pytorch.reformer_pytorch", "reformer.reformer_pytorch"),
    "ReformerEncDec": ("reformer_pytorch.reformer_enc_dec", "reformer.reformer_enc_dec"),
    "Recorder": ("reformer_pytorch.recorder", "reformer.recorder"),
    "Autopadder": ("reformer_pytorch.autopadder", "reformer.autopadder"),
    "TrainingWrapper": ("reformer_pytorch.generative_tools", "reformer.generative_tools"),
}
METHODS = ("__init__", "forward", "generate", "turn_on", "turn_off", "clear", "eject")

#: Peer parameters we do not offer, each listed in the README's "Differences from
#: reformer_pytorch" table. Anything else missing fails the test.
NOT_OFFERED: dict[tuple[str, str], set[str]] = {}


def peer_signatures() -> dict[str, list[list[str]]]:
    """``{"Class.method": [[name, kind, repr(default) or ""], ...]}`` of the installed peer."""
    out = {}
    for name, (module, _) in CLASSES.items():
        cls = getattr(importlib.import_module(module), name)
        for method in METHODS:
            if method in vars(cls):
                params = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]  # (no self)
                out[f"{name}.{method}"] = [[p.name, p.kind.name, _default(p.default)] for p in params]
    return out


def _default(value: object) -> str:
    """A default as text: its repr, a function by its name, "" for none."""
    if value is inspect.Parameter.empty:
        return ""
    return f"<function {value.__name__}>" if inspect.isfunction(value) else repr(value)


def test_snapshot_equals_installed_peer():
    pytest.importorskip("reformer_pytorch", reason="the compat extra (reformer_pytorch 1.4.4) is not installed")
    assert peer_signatures() == json.loads(SNAPSHOT.read_text())


def _accepts(ours, name: str, kind: str) -> bool:
    """Whether callable ``ours`` takes the peer's parameter ``name`` of ``kind``."""
    params = inspect.signature(ours).parameters
    if name in params or kind in ("VAR_KEYWORD", "VAR_POSITIONAL"):  # (the peer's catch-alls name nothing)
        return True
    # A forwarding wrapper (Recorder, Autopadder) passes the data argument on positionally.
    return kind == "POSITIONAL_OR_KEYWORD" and any(p.kind == p.VAR_POSITIONAL for p in params.values())


def _config_names() -> set[str]:
    return set(ReformerConfig.__dataclass_fields__) | set(PEER_ALIASES)


@pytest.mark.parametrize("key", sorted(json.loads(SNAPSHOT.read_text())))
def test_every_peer_parameter_is_accepted(key):
    cls_name, method = key.split(".")
    ours_cls = getattr(importlib.import_module(CLASSES[cls_name][1]), cls_name)
    assert hasattr(ours_cls, method), f"{cls_name} has no {method}"
    ours = getattr(ours_cls, method)
    # Models take their options as ReformerConfig fields through **kwargs.
    by_config = cls_name in ("Reformer", "ReformerLM") and method == "__init__"
    missing = {
        name
        for name, kind, _ in json.loads(SNAPSHOT.read_text())[key]
        if not _accepts(ours, name, kind) and not (by_config and name in _config_names())
    }
    assert missing == NOT_OFFERED.get((cls_name, method), set())


def _peer_defaults(key: str) -> dict:
    """The peer's default of every parameter of ``key`` that has a literal one."""
    defaults = {}
    for name, _, default in json.loads(SNAPSHOT.read_text())[key]:
        if default and not default.startswith("<"):
            defaults[name] = ast.literal_eval(default)
    return defaults


@pytest.mark.parametrize(
    "name, required",
    [
        ("ReformerLM", dict(num_tokens=32, dim=32, depth=1, max_seq_len=128)),
        ("Reformer", dict(dim=32, depth=1)),
        ("LSHSelfAttention", dict(dim=32)),
        ("LSHAttention", {}),
        ("FullQKAttention", {}),
    ],
)
def test_peer_defaults_construct(name, required):
    """Every keyword at the peer's default value builds (e.g. ``ff_activation=None``,
    ``attn_chunks=None``, ``pkm_layers=()``, ``dim_head=None``)."""
    options = {**_peer_defaults(f"{name}.__init__"), **required}
    for not_offered in NOT_OFFERED.get((name, "__init__"), ()):
        options.pop(not_offered)
    getattr(reformer, name)(**options)


if __name__ == "__main__":
    lines = [
        f"  {json.dumps(key)}: [\n" + ",\n".join(f"    {json.dumps(p)}" for p in params) + "\n  ]"
        for key, params in peer_signatures().items()
    ]
    SNAPSHOT.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {SNAPSHOT}")
