"""Sphinx configuration of the salmask documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html

The gallery's figures are drawn by ``docs/gallery/generate.py`` into ``docs/gallery/_generated`` (not
committed): the build runs it when a figure is missing or older than the code that draws it. The
benchmarks page includes ``benchmarks/RESULTS.md`` when the checkout has it, through
``docs/_generated`` (not committed either).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re
import runpy
import sys
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.pycode import ModuleAnalyzer

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import salmask  # noqa: E402

project = "salmask"
author = "the salmask authors"
copyright = "the salmask authors"
release = salmask.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    "mathml",
]
# Math is written as MathML when the site is built (docs/_ext/mathml.py): pages need no script from a CDN.
html_math_renderer = "mathml"

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated"]
html_theme = "furo"
html_title = f"salmask {release}"
templates_path: list[str] = []

# -- Markdown -----------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# -- API reference ------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}

autodoc_class_signature = "separated"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
# torchvision's Transform docstrings point into torchvision's own site; salmask documents its overrides.
autodoc_inherit_docstrings = False

# The site builds offline, so there is no intersphinx inventory for the libraries salmask builds on:
# references into them stay plain text instead of failing the nitpicky build. Every reference to a
# salmask name must resolve.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|torchvision|PIL|numpy|np|timm)(\..*)?"),
    (r"py:.*", r"(os|pathlib|collections\.abc|typing|argparse|contextlib)\..*"),
    (r"py:.*", r"(Tensor|Path|Any|Callable|Sequence|Mapping|Literal|Self)"),
    (r"py:.*", r"(int|float|str|bool|dict|list|tuple|None|object|type|bytes)"),
    (r"py:.*", r"(Ellipsis|NamedTuple|RuntimeError|ValueError|TypeError|ImportError|FileNotFoundError)"),
]

# Public modules whose ``__all__`` the API reference documents, in the order a name is looked up when it
# is re-exported from several (``salmask.SCDA`` is documented as ``salmask.saliency.SCDA``).
API_MODULES = [
    "salmask.transforms",
    "salmask.tv_tensors",
    "salmask.losses",
    "salmask.saliency",
    "salmask.data",
    "salmask.functional",
    "salmask.distributed",
    "salmask.ssl",
]


def documented_modules() -> list[str]:
    """The API modules that exist in this checkout (``salmask.ssl`` may not)."""
    found = []
    for name in API_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        found.append(name)
    return found


def public_aliases() -> dict[str, str]:
    """Map each re-exported public name (``salmask.SCDA``) to where the reference documents it."""
    aliases = {}
    modules = [importlib.import_module(name) for name in documented_modules()]
    for exporter in [salmask, *modules]:
        for name in getattr(exporter, "__all__", []):
            obj = getattr(exporter, name)
            for module in modules:
                if name in getattr(module, "__all__", []) and getattr(module, name) is obj:
                    documented = f"{module.__name__}.{name}"
                    if documented != f"{exporter.__name__}.{name}":
                        aliases[f"{exporter.__name__}.{name}"] = documented
                    break
    return aliases


_ALIASES = public_aliases()


def resolve_public_alias(
    app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element
) -> nodes.Element | None:
    """Resolve ``salmask.Saliency`` (and members such as ``salmask.SCDA.foreground``) to the documented
    ``salmask.tv_tensors.Saliency``: docstrings refer to objects by the path users import them from."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    for alias, documented in _ALIASES.items():
        if target == alias or target.startswith(alias + "."):
            node["reftarget"] = documented + target[len(alias) :]
            return env.get_domain("py").resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], node["reftarget"], node, contnode
            )
    return None


def skip_namedtuple_fields(app: Sphinx, what: str, name: str, obj: object, skip: bool, options: object) -> bool | None:
    """Skip the generated ``Alias for field number N`` members of a NamedTuple: its docstring's
    ``Attributes`` section documents the fields."""
    if what == "class" and (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def find_data_comment(module_name: str, name: str) -> list[str]:
    """The ``#:`` comment of constant ``name`` in the package module that defines it."""
    module = importlib.import_module(module_name)
    candidates = [module_name]
    if hasattr(module, "__path__"):
        candidates += [f"{module_name}.{info.name}" for info in pkgutil.iter_modules(module.__path__)]
    for candidate in candidates:
        try:
            attr_docs = ModuleAnalyzer.for_module(candidate).find_attr_docs()
        except Exception:  # a module without source cannot hold the comment
            continue
        if ("", name) in attr_docs:
            return list(attr_docs[("", name)])
    return []


def document_reexported_data(app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]) -> None:
    """Give a re-exported constant the ``#:`` comment written where it is defined (autodoc would show the
    docstring of its type, ``dict`` or ``tuple``, instead)."""
    if what == "data":
        module_name, _, attribute = name.rpartition(".")
        comment = find_data_comment(module_name, attribute)
        if comment:
            lines[:] = comment


# -- Gallery ------------------------------------------------------------------------------------------
GALLERY_SCRIPT = DOCS / "gallery" / "generate.py"


def generate_gallery(app: Sphinx) -> None:
    """Draw the gallery's figures when one is missing or older than the code that draws it."""
    generator = runpy.run_path(str(GALLERY_SCRIPT))
    if generator["is_stale"]():
        generator["main"]([])


# -- Benchmark results -------------------------------------------------------------------------------
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_PAGE = DOCS / "_generated" / "benchmark_results.md"


def results_markdown(text: str | None) -> str:
    """``benchmarks/RESULTS.md`` as a section of the benchmarks page: headings one level down, and links
    to files of the repository (which are not pages of the site) as file names."""
    if text is None:
        return (
            "This copy of the documentation was built from a checkout without `benchmarks/RESULTS.md`; the "
            "commands above produce the numbers for your hardware.\n"
        )
    text = re.sub(r"^(#+)", r"#\1", text, flags=re.M)
    return re.sub(r"\[([^\]]+)\]\((?!https?:|#)([^)]+)\)", r"\1 (`\2`)", text)


def include_benchmark_results(app: Sphinx) -> None:
    """Write the page section the benchmarks page includes (rewritten only when it changes)."""
    content = results_markdown(RESULTS.read_text() if RESULTS.exists() else None)
    RESULTS_PAGE.parent.mkdir(exist_ok=True)
    if not RESULTS_PAGE.exists() or RESULTS_PAGE.read_text() != content:
        RESULTS_PAGE.write_text(content)


def show_public_bases(app: Sphinx, name: str, obj: object, options: object, bases: list) -> None:
    """Show a class deriving from a private base (a shared implementation) as deriving from its public base."""
    bases[:] = [
        next(c for c in base.__mro__ if not c.__name__.startswith("_")) if isinstance(base, type) else base
        for base in bases
    ]


def setup(app: Sphinx) -> None:
    app.connect("builder-inited", include_benchmark_results)
    app.connect("builder-inited", generate_gallery)
    app.connect("missing-reference", resolve_public_alias)
    app.connect("autodoc-process-docstring", document_reexported_data)
    app.connect("autodoc-skip-member", skip_namedtuple_fields)
    app.connect("autodoc-process-bases", show_public_bases)
