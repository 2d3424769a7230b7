"""A Sphinx HTML math renderer that writes MathML at build time, so pages show their math with no network.

Sphinx's default renderer, MathJax, loads a script from a CDN and leaves raw LaTeX on a page read
offline. Here each formula is converted by ``latex2mathml`` (pure Python, from PyPI) when the page is
written; browsers lay out MathML themselves, so the site needs no script and no download. A command the
converter does not know is a build warning (an error under ``-W``), never raw LaTeX on the page.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.writers.html5 import HTML5Translator

logger = logging.getLogger(__name__)


class UnsupportedLatexError(ValueError):
    """The formula uses a LaTeX command that the MathML converter passed through unconverted."""


def latex_to_mathml(latex: str, *, display: bool) -> str:
    """``latex`` as a ``<math>`` element, inline or as a block.

    Raises:
        UnsupportedLatexError: the converter left a LaTeX command in its output.
    """
    mathml = convert(latex.strip(), display="block" if display else "inline")
    if "\\" in mathml:
        raise UnsupportedLatexError(f"MathML cannot render {latex.strip()!r}: an unsupported LaTeX command")
    return mathml


def _render(translator: HTML5Translator, node: nodes.Element, display: bool) -> str:
    try:
        return latex_to_mathml(node.astext(), display=display)
    except Exception as error:
        logger.warning("%s", error, location=node)
        return f'<span class="math">{translator.encode(node.astext())}</span>'


def visit_math(translator: HTML5Translator, node: nodes.math) -> None:
    translator.body.append(_render(translator, node, display=False))
    raise nodes.SkipNode


def visit_displaymath(translator: HTML5Translator, node: nodes.math_block) -> None:
    # A block <math> has vertical margins of its own; the theme's scrolling container would show a bar for them.
    translator.body.append(translator.starttag(node, "div", CLASS="math", style="overflow-y: hidden"))
    if node.get("number"):
        translator.body.append(f'<span class="eqno">({node["number"]})</span>')
    translator.body.append(_render(translator, node, display=True))
    translator.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_html_math_renderer("mathml", inline_renderers=(visit_math, None), block_renderers=(visit_displaymath, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
