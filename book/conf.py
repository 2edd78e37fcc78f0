"""Sphinx configuration of the compendium's site (`make book`; book/build.py stages the sources).

Why Sphinx + myst-nb + sphinx-book-theme (the stack of Jupyter Book 1) and not MyST (mystmd):
it installs from PyPI into .venv with the project's lock (extra `book`, constraints.txt), so
one package manager pins everything; it builds offline, where mystmd downloads its site theme
at build time. Jupyter Book 1's own CLI is left out: it pins myst-parser 3, which cannot share
the lock's markdown-it-py 4; its `_toc.yml` format is kept (sphinx-external-toc).
"""

project = "Source Matters compendium"
author = "The Source Matters compendium authors"
extensions = ["myst_nb", "sphinx_external_toc"]
external_toc_path = "_toc.yml"
external_toc_exclude_missing = False

# The committed outputs are the content: never execute a notebook here.
nb_execution_mode = "off"
# Cells hidden from the site: tag HIDE_TAG; book/build.py turns it into myst-nb's "remove-cell".
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3  # README/docs links to #headings resolve
# docs pages do not always start at "#"; RUNS.md shows JSON with "..." in it
suppress_warnings = ["myst.header", "misc.highlighting_failure"]

html_theme = "sphinx_book_theme"
html_title = "Source Matters compendium"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_last_updated_fmt = None
html_show_sourcelink = False
exclude_patterns = ["_build"]
