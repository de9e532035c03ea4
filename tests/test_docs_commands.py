"""The commands the docs show still take the options the docs give them: every `d2moe VERB
--option` and `python benchmarks/X.py --option` in README.md and docs/ (code spans and
indented command lines), checked against the verb's parser or the script's `--help`. A
renamed or dropped option would otherwise leave a reproduce line that no longer runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_cli import _options, _parsers
from tests.test_gpu_session import _helps

ROOT = Path(__file__).parents[1]
COMMAND = re.compile(r"(?:^|\s|/)(?:python3? )?(benchmarks/\w+\.py|d2moe)((?: +[^ ]+)*)")
OPTION = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")


def _doc_commands() -> list[tuple[str, str, str, list[str]]]:
    """(doc file, the command as written, target: `d2moe VERB...` or a script path, its
    options) of every command with options in the docs."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = doc.read_text()
        spans = re.findall(r"`([^`\n]+)`", text) + re.findall(
            r"^\s*((?:\.venv/bin/)?(?:d2moe|python3? benchmarks/)[^\n#]*)", text, re.M)
        for span in spans:
            for m in COMMAND.finditer(span):
                target, rest = m.group(1), re.split(r"\s(?:\||>|2>|&&|;)", m.group(2))[0]
                options = sorted(set(OPTION.findall(rest)) - {"--help"})
                if options:
                    out.append((str(doc.relative_to(ROOT)), span, target, rest, options))
    return [(doc, span, _verb(target, rest), options) for doc, span, target, rest, options
            in out]


def _verb(target: str, rest: str) -> str:
    """A script as it is; `d2moe` with as many of the following words as name (sub)verbs."""
    if target != "d2moe":
        return target
    known, name = dict(_parsers()), "d2moe"
    for word in rest.split():
        if f"{name} {word}" not in known:
            break
        name = f"{name} {word}"
    return name


def test_every_option_the_docs_show_exists() -> None:
    pytest.importorskip("torch")
    uses = [u for u in _doc_commands() if u[2] != "d2moe"]  # (bare `d2moe --version`)
    assert len(uses) > 100  # the parse found them
    parsers = dict(_parsers())
    helps = _helps(sorted({(t, ("--help",)) for _, _, t, _ in uses if t.endswith(".py")}))
    missing = []
    for doc, span, target, options in uses:
        if target.endswith(".py"):
            text = helps[f"{target} --help"]
            assert "usage:" in text, (target, text[-300:])
            known = {o for o in options if re.search(re.escape(o) + r"(?![\w-])", text)}
        else:
            known = {s for a in _options(parsers[target]) for s in a.option_strings}
        missing += [(doc, span[:100], o) for o in options if o not in known]
    assert not missing, missing


def test_every_relative_link_in_the_docs_resolves() -> None:
    links, broken = 0, []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for m in re.finditer(r"\]\(([^)\s]+)\)", doc.read_text()):
            target = m.group(1).split("#")[0]
            if not target or re.match(r"[a-z]+://", target):
                continue
            links += 1
            if not (doc.parent / target).exists():
                broken.append((str(doc.relative_to(ROOT)), target))
    assert links > 50 and not broken, broken
