"""The documentation as a reader meets it: every Python block runs, every command names a real script and
real options, and the Sphinx site builds without a warning and documents every public name.

Python blocks of one page run in order in one namespace, in a temporary directory, like a reader pasting
them into one session. A block that cannot run here (it needs ImageNet, a GPU or a cluster) is marked by a
comment on the line just before it, which the rendered page does not show, and is still compiled:

- Markdown pages (MyST): ``% skip-test: <reason>``
- README.md: ``<!-- skip-test: <reason> -->``
- reStructuredText: ``.. skip-test: <reason>``
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import salmask

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Languages a fenced block may carry (none: plain text). Python runs only under the name "python", so that
# no block escapes the test under another spelling.
SHELL_LANGUAGES = {"bash", "console", "shell", "sh"}
OTHER_LANGUAGES = {"", "text", "yaml", "toml", "ini", "diff"}
OTHER_LANGUAGES |= {"{toctree}", "{include}", "{literalinclude}", "{eval-rst}"}
SKIP_MARKERS = (
    re.compile(r"^%\s*skip-test:\s*(\S.*)$"),
    re.compile(r"^<!--\s*skip-test:\s*(\S.*?)\s*-->$"),
    re.compile(r"^\.\.\s+skip-test:\s*(\S.*)$"),
)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    language: str
    code: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for path in sorted(DOCS.rglob("*")):
        parts = path.relative_to(DOCS).parts
        if path.suffix in (".md", ".rst") and "_build" not in parts and "_generated" not in parts:
            files.append(path)
    return files


def _skip_reason(lines: list[str], index: int) -> str | None:
    """The skip marker on the last non-blank line before line ``index``, if any."""
    for previous in reversed(lines[:index]):
        if previous.strip():
            for marker in SKIP_MARKERS:
                match = marker.match(previous.strip())
                if match:
                    return match.group(1)
            return None
    return None


def _markdown_blocks(path: Path, lines: list[str]) -> list[Block]:
    blocks, index = [], 0
    while index < len(lines):
        fence = re.match(r"^(\s*)(`{3,}|:{3,})\s*([^\s`]*)", lines[index])
        if not fence:
            index += 1
            continue
        indent, marks, language = fence.groups()
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(marks):
            end += 1
        code = "\n".join(line.removeprefix(indent) for line in lines[index + 1 : end])
        if marks.startswith("`"):
            blocks.append(Block(path, index + 2, language, code, _skip_reason(lines, index)))
        index = end + 1
    return blocks


def _rst_blocks(path: Path, lines: list[str]) -> list[Block]:
    blocks = []
    for index, line in enumerate(lines):
        directive = re.match(r"^(\s*)\.\.\s+(?:code-block|code|sourcecode)::\s*(\S+)", line)
        if not directive:
            continue
        indent = len(directive.group(1))
        body, end = [], index + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
            body.append(lines[end])
            end += 1
        text = "\n".join(body)
        common = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
        code = "\n".join(x[common:] for x in text.splitlines() if not x.lstrip().startswith(":"))
        blocks.append(Block(path, index + 2, directive.group(2), code, _skip_reason(lines, index)))
    return blocks


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    return _rst_blocks(path, lines) if path.suffix == ".rst" else _markdown_blocks(path, lines)


def python_pages() -> list[Path]:
    return [path for path in doc_files() if any(block.language == "python" for block in blocks_of(path))]


# ---------------------------------------------------------------------------------------------------
# Code blocks


def test_the_block_finder_sees_markers_and_languages():
    page = "Intro\n\n% skip-test: needs ImageNet\n```python\nimport imagenet\n```\n\n```bash\nls\n```\n"
    lines = page.splitlines()
    found = _markdown_blocks(Path("page.md"), lines)
    assert [(b.language, b.code, b.skip_reason, b.line) for b in found] == [
        ("python", "import imagenet", "needs ImageNet", 5),
        ("bash", "ls", None, 9),
    ]
    rst = "Text\n\n.. skip-test: needs a GPU\n.. code-block:: python\n   :caption: x\n\n   a = 1\n   b = 2\n\nAfter\n"
    (block,) = _rst_blocks(Path("page.rst"), rst.splitlines())
    assert (block.language, block.code.strip(), block.skip_reason) == ("python", "a = 1\nb = 2", "needs a GPU")


def test_every_block_has_a_known_language():
    unknown = [
        f"{block.where}: {block.language or '(none)'}"
        for path in doc_files()
        for block in blocks_of(path)
        if block.language not in {"python"} | SHELL_LANGUAGES | OTHER_LANGUAGES
    ]
    assert not unknown, "tag code blocks python (run by this test), bash or text: " + ", ".join(unknown)


def test_the_docs_have_python_blocks_to_run():
    pages = {path.relative_to(ROOT).as_posix() for path in python_pages()}
    assert {"README.md", "docs/quickstart.md"} <= pages


@pytest.mark.parametrize("path", python_pages(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks_of(path):
        if block.language != "python":
            continue
        compiled = compile(block.code, block.where, "exec")
        if block.skip_reason is not None:
            continue
        try:
            exec(compiled, namespace)
        except Exception as error:
            raise AssertionError(f"the block at {block.where} failed: {type(error).__name__}: {error}") from error


def test_skipped_blocks_say_why_and_are_rare():
    skipped = [block for path in doc_files() for block in blocks_of(path) if block.skip_reason is not None]
    run = [block for path in doc_files() for block in blocks_of(path) if block.language == "python"]
    assert all(len(block.skip_reason) >= 10 for block in skipped), [block.where for block in skipped]
    assert all(block.language == "python" for block in skipped), "only python blocks run, so only they skip"
    assert len(skipped) * 3 <= len(run), "most python blocks must run"


# ---------------------------------------------------------------------------------------------------
# Commands in shell blocks

SCRIPT_COMMAND = re.compile(r"(?:^|\s)(?:\S*python3?|torchrun)\s")


def shell_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of each command in a shell block that runs a salmask script or module."""
    commands = []
    for path in doc_files():
        for block in blocks_of(path):
            if block.language not in SHELL_LANGUAGES:
                continue
            text = re.sub(r"\\\n\s*", " ", block.code)
            for line in text.splitlines():
                line = re.sub(r"^\s*\$\s+", "", line.split(" #")[0])
                for command in re.split(r"&&|\|\||;|\|", line):
                    if SCRIPT_COMMAND.search(" " + command):
                        commands.append((block.where, shlex.split(command)))
    return commands


def script_of(argv: list[str]) -> list[str] | None:
    """The ``python`` invocation of a command's salmask script or module, or ``None`` for other programs."""
    for index, word in enumerate(argv):
        if word == "-m" and index + 1 < len(argv) and argv[index + 1].startswith("salmask"):
            return ["-m", argv[index + 1]]
        if word.endswith(".py") and (ROOT / word).parent.name in ("examples", "benchmarks", "gallery"):
            return [word]
    return None


@functools.cache
def help_text(script: tuple[str, ...]) -> str:
    result = subprocess.run([sys.executable, *script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"{' '.join(script)} --help failed:\n{result.stderr}"
    return result.stdout


def test_shell_commands_name_existing_scripts_and_options():
    problems = []
    for where, argv in shell_commands():
        script = script_of(argv)
        if script is None:
            continue
        if script[0] == "-m":
            if importlib.util.find_spec(script[1]) is None:
                problems.append(f"{where}: no module {script[1]}")
                continue
        elif not (ROOT / script[0]).is_file():
            problems.append(f"{where}: no file {script[0]}")
            continue
        # Options before the script belong to its launcher (python, torchrun), not to the script.
        script_at = next(index for index, word in enumerate(argv) if word == script[-1])
        options = {word.split("=")[0] for word in argv[script_at + 1 :] if word.startswith("--")}
        text = help_text(tuple(script))
        problems += [
            f"{where}: {' '.join(script)} has no option {option}"
            for option in sorted(options)
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)
        ]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------
# The site


def _includes_extra(extras: dict[str, list[str]], extra: str, wanted: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``extra`` pulls in ``wanted`` through ``salmask[...]`` requirements, directly or not."""
    for requirement in extras.get(extra, []):
        match = re.match(r"\s*salmask\[([^\]]+)\]", requirement)
        for name in (part.strip() for part in match.group(1).split(",")) if match else ():
            if name == wanted or (name not in seen and _includes_extra(extras, name, wanted, seen | {extra})):
                return True
    return False


def _docs_required() -> bool:
    """The docs tools are part of the test extra once it includes ``docs`` (``salmask[...,docs,...]``): then
    a missing tool is an installation error, not a reason to skip."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return _includes_extra(extras, "test", "docs")


def test_the_test_extra_requires_the_docs_tools():
    assert _docs_required()
    assert _includes_extra({"a": ["salmask[b, c]"], "c": ["salmask[docs]"]}, "a", "docs")
    assert not _includes_extra({"a": ["salmask[b]"], "b": ["salmask[a]", "x[docs]"]}, "a", "docs")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    for module in ("sphinx", "furo", "myst_parser", "latex2mathml"):
        if importlib.util.find_spec(module) is None:
            if _docs_required():
                pytest.fail(f"{module} is missing although the test extra includes salmask[docs]")
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html"]
    command += ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, f"the docs build failed or warned:\n{result.stderr[-10000:]}"
    return out / "html"


def test_site_builds_without_warnings(built_site):
    assert (built_site / "index.html").is_file()
    assert (built_site / "_images" / "masking.png").is_file(), "the gallery's figures are missing"


def test_math_is_mathml_in_the_page_with_no_script_from_the_network(built_site):
    source = (DOCS / "concepts.md").read_text()
    formulas = re.findall(r"\$\$.+?\$\$|\$[^$\n]+\$", source, flags=re.S)
    page = (built_site / "concepts.html").read_text()
    assert len(formulas) >= 10 and page.count("<math ") == len(formulas)
    assert "\\frac" not in page and "$$" not in page, "raw LaTeX left on the page"
    for html in built_site.rglob("*.html"):
        sources = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", html.read_text())
        remote = [source for source in sources if re.match(r"(https?:)?//", source)]
        assert not remote, f"{html.relative_to(built_site)} loads {remote}"


def test_the_math_renderer_refuses_latex_it_cannot_convert():
    if importlib.util.find_spec("latex2mathml") is None and not _docs_required():
        pytest.skip("latex2mathml is not installed (pip install -e '.[docs]')")
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        mathml = importlib.import_module("mathml")
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    block = mathml.latex_to_mathml(r"\frac{a}{b} \cdot \rho", display=True)
    assert block.startswith("<math") and 'display="block"' in block and "<mfrac>" in block
    with pytest.raises(mathml.UnsupportedLatexError, match="notacommand"):
        mathml.latex_to_mathml(r"x \notacommand y", display=False)


def test_api_reference_documents_every_public_name(built_site):
    from sphinx.util.inventory import InventoryFile

    with open(built_site / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", os.path.join)
    documented = {name for entries in inventory.values() for name in entries}
    sys.path.insert(0, str(DOCS))
    try:
        conf = importlib.import_module("conf")
    finally:
        sys.path.remove(str(DOCS))
    missing = []
    for module_name in conf.documented_modules():
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{name}" for name in module.__all__ if f"{module_name}.{name}" not in documented]
    aliases = conf.public_aliases()
    for name in salmask.__all__:
        if name == "__version__" or isinstance(getattr(salmask, name), type(salmask)):
            continue
        target = aliases.get(f"salmask.{name}", f"salmask.{name}")
        if target not in documented:
            missing.append(f"salmask.{name}")
    assert not missing, "not in the API reference: " + ", ".join(missing)
