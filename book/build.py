"""Build the compendium's site from the committed, executed notebooks: `make book`.

    python book/build.py [--out _build/book] [--root CHECKOUT]
    python book/build.py --tags    the cell tags the notebooks use; the one the site hides

1. Checks that every notebook in book/_toc.yml was executed (has outputs, every code cell ran);
   a never-executed notebook stops the build with an error naming it. Nothing is executed.
2. Stages the pages of book/_toc.yml and the files they reference (docs/, the paper kit) in
   OUT/src with the repository's layout, so the README's relative links resolve in the site;
   cells tagged HIDE_TAG get myst-nb's "remove-cell" there (the notebooks are not changed).
3. Runs sphinx-build (book/conf.py) into OUT/html and writes OUT/html/index.html, a redirect to
   the first page.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
HIDE_TAG = "hide-from-site"  # the tag of the cells the site hides (regression checks)
STAGED = ["README.md", "notebooks", "docs"]  # docs/ holds figures and the paper kit too
# Sphinx warnings that mean a link or a page of the table of contents is lost: they fail the build
BROKEN = ("[myst.xref_missing]", "[ref.", "[toc.", "[image.not_readable]", "[myst.iref_ambiguous]")


class NotExecuted(RuntimeError):
    """A notebook of the site has no outputs: the site shows committed outputs only."""


class BrokenSite(RuntimeError):
    """Sphinx failed, or warned of a link, image or page it could not resolve."""


def toc_files(toc_path: Path = BOOK / "_toc.yml") -> dict[str, str | None]:
    """The pages of the table of contents, in order, without suffix: their titles, if given."""
    toc = yaml.safe_load(toc_path.read_text())
    files = {toc["root"]: None}
    for part in toc.get("parts", []):
        files |= {chapter["file"]: chapter.get("title") for chapter in part["chapters"]}
    return files


def check_executed(path: Path) -> None:
    """Raise NotExecuted naming `path` if it has code but no outputs or a cell that never ran."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    if not code:
        return
    if not any(c.get("outputs") for c in code):
        raise NotExecuted(f"{path.name} has no outputs: it was never executed. Run it "
                          f"(e.g. `make notebooks` or `sm notebook {path.name} ...`), commit "
                          "the executed notebook, then build the site")
    unrun = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and c.source.strip() and c.get("execution_count") is None]
    if unrun:
        raise NotExecuted(f"{path.name}: code cell(s) {unrun} never ran (a partial run?); "
                          "re-execute the notebook and commit it before building the site")


def hide_tagged_cells(path: Path) -> int:
    """Add "remove-cell" to the cells tagged HIDE_TAG in the staged copy; return how many."""
    nb = nbformat.read(path, as_version=4)
    hidden = 0
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if HIDE_TAG in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
            hidden += 1
    if hidden:
        nbformat.write(nb, path)
    return hidden


def stage(root: Path, src: Path, files: dict[str, str | None]) -> None:
    """Copy the site's sources from `root` into `src` (emptied first), keeping their paths; a
    markdown page without a "# " heading gets its title from the table of contents."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in STAGED:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        else:
            shutil.copy2(source, src / name)
    for name in ("conf.py", "_toc.yml"):
        shutil.copy2(BOOK / name, src / name)
    for page, title in files.items():
        md = src / f"{page}.md"
        if not md.exists() and not (src / f"{page}.ipynb").exists():
            raise FileNotFoundError(f"book/_toc.yml names {page}, which is not in {STAGED}")
        text = md.read_text() if md.exists() else ""
        if title and not any(line.startswith("# ") for line in text.splitlines()):
            md.write_text(f"# {title}\n\n{text}")  # e.g. the paper kit's generated tables


def build(out: Path, root: Path = ROOT) -> Path:
    files = toc_files()
    notebooks = [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").exists()]
    for notebook in notebooks:  # before anything is built
        check_executed(notebook)
    src, html = out / "src", out / "html"
    stage(root, src, files)
    for notebook in notebooks:
        n = hide_tagged_cells(src / notebook.relative_to(root))
        print(f"{notebook.relative_to(root)}: {n} cell(s) tagged {HIDE_TAG} hidden")
    if html.exists():
        shutil.rmtree(html)
    # -E: read every source again (staged copies are new files); -q: warnings and errors only
    done = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-q", "-b", "html", str(src),
                           str(html)], check=False, capture_output=True, text=True)
    sys.stderr.write(done.stdout + done.stderr)
    broken = [line for line in done.stderr.splitlines() if any(k in line for k in BROKEN)]
    if done.returncode or broken:
        raise BrokenSite(f"sphinx-build exited {done.returncode}; unresolved: {len(broken)}\n"
                         + "\n".join(broken))
    first = next(iter(files))
    (html / "index.html").write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Redirect</title>'
        f'<meta http-equiv="refresh" content="0; url={first}.html"></head>'
        f'<body><a href="{first}.html">{first}</a></body></html>\n')
    print(f"site: {html / (first + '.html')}")
    return html


def cell_tags(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """The cell tags each notebook of the site uses, with how many cells carry each."""
    found = {}
    for page in toc_files():
        path = root / f"{page}.ipynb"
        if path.exists():
            tags = [t for c in nbformat.read(path, as_version=4).cells
                    for t in c.metadata.get("tags", [])]
            found[path.name] = {t: tags.count(t) for t in sorted(set(tags))}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "book")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to build from")
    parser.add_argument("--tags", action="store_true",
                        help=f"list the notebooks' cell tags (the site hides {HIDE_TAG}) and stop")
    args = parser.parse_args(argv)
    if args.tags:
        for name, tags in cell_tags(args.root.resolve()).items():
            print(f"{name}: {tags}")
        print(f"the site hides cells tagged {HIDE_TAG}")
        return 0
    try:
        build(args.out.resolve(), root=args.root.resolve())
    except (NotExecuted, BrokenSite) as error:
        print(f"make book: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
