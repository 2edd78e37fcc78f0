"""The site (`make book`, book/build.py) and its browser test (`make test-site`, marker site).

The unmarked tests check the build's guards without building. The tests marked site open the
built site (_build/book/html) in Debian's headless chromium through selenium and chromium-driver;
they skip when chromium, chromedriver, selenium or the built site is missing."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_build" / "book" / "html"
SCREENSHOT = ROOT / "_build" / "book" / "site_first_page.png"  # docs/figures/ has a copy

spec = importlib.util.spec_from_file_location("book_build", ROOT / "book" / "build.py")
book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book)


# --- the build's guards (no site needed) -----------------------------------------------------

def _notebook(path: Path, executed: bool, tags: list[str] | None = None) -> Path:
    cell = nbformat.v4.new_code_cell("print(1)", metadata={"tags": tags or []})
    if executed:
        cell.execution_count = 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    return path


def test_a_notebook_never_executed_stops_the_build_naming_it(tmp_path):
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    _notebook(tmp_path / "notebooks" / "03_fine_tuning.ipynb", executed=False)
    done = subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--root",
                           str(tmp_path), "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 1
    assert "03_fine_tuning.ipynb has no outputs: it was never executed" in done.stderr
    assert not (tmp_path / "out").exists()  # stopped before staging or building anything


def test_the_committed_notebooks_pass_the_check():
    notebooks = [ROOT / f"{page}.ipynb" for page in book.toc_files()
                 if (ROOT / f"{page}.ipynb").exists()]
    assert [p.stem[:2] for p in notebooks] == ["02", "03", "04", "05", "00", "01"]  # toc order
    for notebook in notebooks:
        book.check_executed(notebook)


def test_a_partial_run_is_refused_too(tmp_path):
    path = _notebook(tmp_path / "nb.ipynb", executed=True)
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("print(2)"))  # never ran
    nbformat.write(nb, path)
    with pytest.raises(book.NotExecuted, match=r"nb.ipynb: code cell\(s\) \[1\] never ran"):
        book.check_executed(path)


def test_cells_tagged_hide_from_site_are_removed_in_the_staged_copy(tmp_path):
    path = _notebook(tmp_path / "nb.ipynb", executed=True, tags=[book.HIDE_TAG])
    assert book.hide_tagged_cells(path) == 1
    assert nbformat.read(path, as_version=4).cells[0].metadata.tags == [book.HIDE_TAG,
                                                                        "remove-cell"]
    assert book.hide_tagged_cells(_notebook(tmp_path / "b.ipynb", executed=True)) == 0


def test_the_tag_listing_counts_the_tags_of_each_notebook(tmp_path):
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    _notebook(tmp_path / "notebooks" / "03_fine_tuning.ipynb", True, [book.HIDE_TAG, "x"])
    tags = book.cell_tags(tmp_path)
    assert tags["03_fine_tuning.ipynb"] == {book.HIDE_TAG: 1, "x": 1}
    assert tags["01_data_preparation.ipynb"].get("parameters") == 1


def test_every_toc_page_exists_and_the_readme_comes_first():
    pages = list(book.toc_files())
    assert pages[0] == "README"
    missing = [p for p in pages if not any((ROOT / f"{p}{s}").exists() for s in (".md", ".ipynb"))]
    assert missing == []


# --- internal links of a built site (no browser) ---------------------------------------------

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(key):
                self.ids.add(attrs[key])
        ref = {"a": "href", "img": "src", "link": "href", "script": "src"}.get(tag)
        if ref and attrs.get(ref):
            self.refs.append((tag, attrs[ref]))


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(errors="replace"))
    return parser


def broken_links(site: Path) -> list[str]:
    """Every internal href/src of every page whose file or #anchor does not exist."""
    pages = {p: _parse(p) for p in site.rglob("*.html") if "_static" not in p.parts}
    broken = []
    for page, parsed in pages.items():
        for tag, ref in parsed.refs:
            parts = urlsplit(ref)
            if parts.scheme or parts.netloc or ref.startswith(("mailto:", "javascript:")):
                continue  # external: not checked offline
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(site)}: <{tag}> {ref}"
            if not target.is_file():
                broken.append(f"{where} (no file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{where} (no #{parts.fragment})")
    return broken


needs_site = pytest.mark.skipif(not (SITE / "README.html").is_file(),
                                reason="no built site: make book (or make test-site)")


@pytest.mark.site
@needs_site
def test_no_internal_link_of_the_site_is_broken():
    assert broken_links(SITE) == []


@pytest.mark.site
@needs_site
def test_the_link_check_finds_a_broken_link_and_a_missing_anchor(tmp_path):
    copy = tmp_path / "html"
    shutil.copytree(SITE, copy)
    readme = copy / "README.html"
    text = readme.read_text()
    assert 'href="notebooks/03_fine_tuning.html"' in text
    text = text.replace('href="notebooks/03_fine_tuning.html"',
                        'href="notebooks/03_fine_tunning.html"')
    text = text.replace('href="notebooks/02_confounder_injection.html"',
                        'href="notebooks/02_confounder_injection.html#no-such-heading"')
    readme.write_text(text)
    broken = set(broken_links(copy))
    assert "README.html: <a> notebooks/03_fine_tunning.html (no file)" in broken
    assert ("README.html: <a> notebooks/02_confounder_injection.html#no-such-heading "
            "(no #no-such-heading)") in broken
    assert {b.split(" ", 1)[0] for b in broken} == {"README.html:"}  # other pages intact


# --- every page in a real headless browser ---------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and importlib.util.find_spec("selenium")),
    reason="needs Debian's chromium and chromium-driver and selenium (make test-site)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1700",
                "--disable-dev-shm-usage", "--allow-file-access-from-files"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _toc_pages() -> list[str]:
    return list(book.toc_files())


IMAGES_JS = """return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete,
    i.naturalWidth, i.naturalHeight]);"""


@pytest.mark.site
@needs_site
@needs_browser
@pytest.mark.parametrize("page", _toc_pages())
def test_every_page_loads_and_every_image_decodes(browser, page):
    path = SITE / f"{page}.html"
    assert path.is_file(), f"{page} is in book/_toc.yml but was not built"
    browser.get(path.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    heading = browser.execute_script(
        "const h = document.querySelector('article h1'); return h ? h.textContent : null")
    assert heading, f"{page}: no <h1> in the page's article"
    heading = heading.replace("#", "").strip()
    assert heading in browser.title  # the page's own title, not an error page
    text = browser.execute_script("return document.querySelector('article').innerText")
    assert len(text) > 200, f"{page}: article has {len(text)} characters"
    images = browser.execute_script(IMAGES_JS)
    local = [i for i in images if not urlsplit(i[0]).scheme]
    undecoded = [src for src, complete, width, height in local
                 if not (complete and width > 0 and height > 0)]
    assert undecoded == [], f"{page}: images that did not decode: {undecoded}"


HEADLINE = "_images/demo_auc_vs_p.png"  # the README's headline figure, as built


@pytest.mark.site
@needs_site
@needs_browser
def test_the_first_page_shows_the_headline_figure_and_is_not_blank(browser):
    from PIL import Image, ImageStat

    browser.get((SITE / "index.html").as_uri())  # the redirect to the first page
    assert browser.current_url.endswith("/README.html")
    images = browser.execute_script(IMAGES_JS)
    headline = [i for i in images if i[0] == HEADLINE]
    assert headline and headline[0][2] > 300  # decoded at its own width
    browser.save_screenshot(str(SCREENSHOT))
    with Image.open(SCREENSHOT) as shot:
        gray = shot.convert("L")
        assert shot.size[0] >= 1000
        assert ImageStat.Stat(gray).stddev[0] > 20  # text and figures, not one colour
        assert len(gray.getcolors(maxcolors=256 * 256) or range(257)) > 16
