"""The facebookresearch/moco patch is a well-formed git patch whose salmask calls fit salmask's API.

Applying it needs moco's sources, which the test suite cannot download: ``integrations/moco/cpu_check.py``
applies it and trains (see the moco guide). Here: every hunk's line counts agree with its header, it
touches the three files the guide names, every salmask name it uses is exported, every call of one binds
to that name's signature, and every masking strategy its ``--mask`` flag offers makes hard negatives.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from torchvision.transforms import v2

import salmask
from salmask.ssl import MaskedViews, ThreeViews

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "integrations" / "moco" / "salmask.patch"
HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class Hunk:
    path: str
    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: list[str] = field(default_factory=list)

    @property
    def added(self) -> list[str]:
        return [line[1:] for line in self.lines if line.startswith("+")]

    @property
    def new_text(self) -> str:
        """The hunk as the patched file reads: context and added lines."""
        return "\n".join(line[1:] for line in self.lines if line[:1] in (" ", "+"))


def parse_patch(text: str) -> list[Hunk]:
    hunks: list[Hunk] = []
    path = None
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("diff --git "):
            old, new = line.split()[2:4]
            assert old[2:] == new[2:], f"the patch renames {old} (line {index + 1})"
            path = None
        elif line.startswith("--- "):
            assert line == "--- a/" + lines[index + 1][len("+++ b/") :], f"mismatched file names at line {index + 1}"
            path = lines[index + 1][len("+++ b/") :]
            index += 1
        elif line.startswith("@@"):
            match = HUNK_HEADER.match(line)
            assert match and path, f"bad hunk header at line {index + 1}: {line!r}"
            old_start, old_count, new_start, new_count = (int(g) if g else 1 for g in match.groups())
            hunk = Hunk(path, old_start, old_count, new_start, new_count)
            index += 1
            while index < len(lines) and lines[index][:1] in (" ", "+", "-", "\\"):
                if not lines[index].startswith("\\"):
                    hunk.lines.append(lines[index])
                index += 1
            hunks.append(hunk)
            continue
        index += 1
    return hunks


@pytest.fixture(scope="module")
def hunks() -> list[Hunk]:
    return parse_patch(PATCH.read_text())


def test_every_hunk_counts_its_lines_and_hunks_are_in_order(hunks):
    assert hunks
    by_file: dict[str, list[Hunk]] = {}
    for hunk in hunks:
        old = sum(line[:1] in (" ", "-") for line in hunk.lines)
        new = sum(line[:1] in (" ", "+") for line in hunk.lines)
        assert (old, new) == (hunk.old_count, hunk.new_count), f"{hunk.path} hunk at {hunk.old_start}"
        by_file.setdefault(hunk.path, []).append(hunk)
    for path, file_hunks in by_file.items():
        shift = 0
        previous_end = 0
        for hunk in file_hunks:
            assert hunk.old_start > previous_end, f"{path}: overlapping hunks"
            assert hunk.new_start == hunk.old_start + shift, f"{path}: hunk at {hunk.old_start} is misplaced"
            shift += hunk.new_count - hunk.old_count
            previous_end = hunk.old_start + hunk.old_count - 1
    assert set(by_file) == {"moco/builder.py", "main_moco.py", "moco/loader.py"}


def test_the_patch_ends_lines_as_git_apply_expects(hunks):
    text = PATCH.read_text()
    assert text.endswith("\n") and "\r" not in text
    assert all(line == line.rstrip() for hunk in hunks for line in hunk.added), "trailing whitespace"


def salmask_names(hunks: list[Hunk]) -> set[str]:
    names = set()
    for hunk in hunks:
        for line in hunk.added:
            match = re.match(r"\s*from salmask import (.+)$", line)
            if match:
                names |= {name.strip() for name in match.group(1).split(",")}
            assert not re.match(r"\s*(from salmask\.|import salmask)", line), f"import only from salmask: {line}"
    return names


def test_every_salmask_name_it_uses_is_exported(hunks):
    names = salmask_names(hunks)
    assert names == {"extend_moco_logits", "MaskedViews", "SaliencyImageFolder", "ThreeViews", "build_scda"}
    assert names <= set(salmask.__all__)


def calls(text: str, name: str) -> list[str]:
    """The argument text of each call ``name(...)`` in ``text``, across lines."""
    found = []
    for match in re.finditer(rf"(?<![\w.]){name}\(", text):
        depth, start = 1, match.end()
        position = start
        while depth:
            depth += {"(": 1, ")": -1}.get(text[position], 0)
            position += 1
        found.append(text[start : position - 1])
    return found


def test_every_salmask_call_binds_to_the_signature(hunks):
    bound = 0
    for name in salmask_names(hunks):
        signature = inspect.signature(getattr(salmask, name))
        for hunk in hunks:
            for arguments in calls(hunk.new_text, name):
                call = ast.parse(f"f({arguments})", mode="eval").body
                positional = [object()] * len(call.args)
                keywords = {keyword.arg: object() for keyword in call.keywords}
                try:
                    signature.bind(*positional, **keywords)
                except TypeError as error:
                    raise AssertionError(f"{hunk.path}: {name}({arguments.strip()}): {error}") from error
                bound += 1
    assert bound >= 5


def test_every_offered_masking_strategy_makes_hard_negatives(hunks):
    (choices,) = [
        ast.literal_eval(match.group(1))
        for hunk in hunks
        for match in [re.search(r'"--mask",\s*default="none",\s*choices=(\[[^\]]*\])', hunk.new_text)]
        if match
    ]
    assert choices[0] == "none" and len(choices) > 1
    for strategy in choices[1:]:
        ThreeViews(v2.Identity(), MaskedViews(strategy))


def test_the_parser_reads_a_hand_made_patch():
    patch = "diff --git a/f.py b/f.py\n--- a/f.py\n+++ b/f.py\n@@ -1,2 +1,3 @@\n a\n-b\n+c\n+from salmask import X\n"
    (hunk,) = parse_patch(patch)
    assert (hunk.path, hunk.old_count, hunk.new_count, hunk.added) == ("f.py", 2, 3, ["c", "from salmask import X"])
    assert calls("y = g(1, h(2), k=3)\nz = g(\n  4)\n", "g") == ["1, h(2), k=3", "\n  4"]
