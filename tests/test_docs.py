"""No reference that leads nowhere: the documents (README.md, tutorial.md, docs/*.md, tiny_data/README.md) and
the code's comments and docstrings (lsrm.py, model/, tools/, tiny_data/) name only files, tests and sections
that exist; every command line they show parses with lsrm.py's parser; README stays a front door.

Strict about repository paths (`model/x.py`, `docs/x.md`, `tiny_data/...`, `tests/x.py::test_y`), relative
Markdown links and their #anchors, bare `*.py` / `*.md` names and "tutorial §N"; tolerant of every other
word (`runs/tiny/...`, `problems.json`, `weights/llama-7b`: outputs and the user's files)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ["README.md", "tutorial.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
        "tiny_data/README.md"]
CODE = ["lsrm.py", *sorted(str(p.relative_to(ROOT)) for d in ("model", "tools", "tiny_data")
                           for p in (ROOT / d).glob("*.py"))]
TRACKED = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
NAMES = {Path(f).name for f in TRACKED} | {Path(f).name for f in DOCS + CODE}
TOP = ("model", "tools", "tiny_data", "tests", "docs", "figures", ".ci")
WRITTEN = {"ablation.md"}                  # written by `python lsrm.py ablate` into its --out, not committed
PATH = re.compile(r"(?<![\w/.$-])((?:[\w.-]+/)+[\w.-]*)(::\w+)?")
BARE = re.compile(r"(?<![\w/.-])([\w-]+\.(?:py|md))\b")


def text_of(f: str) -> str:
    return (ROOT / f).read_text()


def path_refs(f: str, text: str):
    """(token, resolved path or None) for each strict path-like token in text of file f."""
    here = (ROOT / f).parent
    local = {p.name for p in here.iterdir() if p.is_dir()} if here != ROOT else set()
    for m in PATH.finditer(text):
        token, test = m.group(1).rstrip("."), m.group(2)
        first = token.split("/")[0]
        if any(c in token for c in "{}*<>[]") or (first not in TOP and first not in local):
            continue
        found = next((p for p in (ROOT / token, here / token) if p.exists()), None)
        yield token + (test or ""), found, test


def dead_paths(f: str, text: str) -> list[str]:
    dead = []
    for token, found, test in path_refs(f, text):
        if found is None:
            dead.append(token)
        elif test and f"def {test[2:]}(" not in found.read_text():
            dead.append(token)
    for name in BARE.findall(text):
        if name not in NAMES and name not in WRITTEN:
            dead.append(name)
    return dead


@pytest.mark.parametrize("doc", DOCS)
def test_documents_name_only_files_that_exist(doc):
    assert not dead_paths(doc, text_of(doc)), f"{doc} names what the repository does not hold"


def comments_and_docstrings(f: str) -> str:
    """The comments and string literals of a Python file (docstrings, messages, help texts)."""
    import io
    import tokenize
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text_of(f)).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            out.append(tok.string)
    return "\n".join(out)


@pytest.mark.parametrize("f", CODE)
def test_code_comments_name_only_files_that_exist(f):
    assert not dead_paths(f, comments_and_docstrings(f)), f"{f} names what the repository does not hold"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.*)$", md.read_text(), flags=re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_markdown_links_lead_somewhere(doc):
    dead = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text_of(doc)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, frag = target.partition("#")
        dest = ((ROOT / doc).parent / path) if path else ROOT / doc
        if not dest.exists() or (frag and frag not in anchors(dest)):
            dead.append(target)
    assert not dead, f"{doc}: links that lead nowhere: {dead}"


def tutorial_sections() -> set[str]:
    return set(re.findall(r"^## (\d+)\.", text_of("tutorial.md"), flags=re.M))


@pytest.mark.parametrize("f", DOCS + CODE)
def test_tutorial_sections_cited_exist(f):
    text = text_of(f) if f.endswith(".md") else comments_and_docstrings(f)
    if f == "tutorial.md":      # its own sections: a § not after "paper" (the paper's §3.1 is not ours)
        cited = re.findall(r"(?<!paper )(?<!paper's )§(\d+)(?![.\d])", text)
    else:
        cited = re.findall(r"tutorial(?:\.md)?`?,? §(\d+)", text)
    assert set(cited) <= tutorial_sections(), f"{f} cites tutorial sections {sorted(set(cited) - tutorial_sections())}"


def test_no_tracker_numbers_anywhere():
    hits = []
    for f in TRACKED:
        if f.startswith(("tiny_data/scienceqa/", "tiny_data/coco/")) or not f.endswith((".py", ".md", ".txt", ".ini", "run")):
            continue
        for n, line in enumerate(text_of(f).splitlines(), 1):
            if re.search(r"\bissues? ?#?\d+|(?<![\w&])#\d+\b", line, flags=re.I):
                hits.append(f"{f}:{n}: {line.strip()}")
    assert not hits, hits


# ---------------------------------------------------------------------------------------------
# Command lines

def command_lines():
    """Every `lsrm.py ...` command the documents show: in code blocks, and inline as `python lsrm.py ...`."""
    for doc in DOCS:
        text = text_of(doc)
        for block in re.findall(r"^```(?:bash|console)\n(.*?)^```", text, flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.removeprefix("$ ")
                if "lsrm.py " in line and not line.startswith(("#", " ")):
                    yield doc, line
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for span in re.findall(r"`([^`]*lsrm\.py [^`]*)`", prose):
            if not re.search(r"\b[A-Z]{4,}\b|\.\.\.|\[", span):    # COMMAND, NAME, "...", [optional]: a pattern
                yield doc, " ".join(span.split())


@pytest.mark.parametrize("doc,line", list(command_lines()))
def test_command_lines_parse(doc, line):
    import lsrm
    from model.assemble import load_config
    argv = shlex.split(line, comments=True)
    argv = argv[argv.index("lsrm.py") + 1:]
    try:
        args = lsrm.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{doc}: `{line}` does not parse")
    if hasattr(args, "config") and args.command not in ("bench",):
        load_config(args.config, args.set)          # every --set key and value is valid for that config


def test_readme_is_a_front_door():
    readme = text_of("README.md")
    assert len(readme.splitlines()) <= 160
    quickstart = re.search(r"## Quickstart\n\n```bash\n(.*?)```", readme, flags=re.S).group(1)
    shown = {line.split("#")[0].strip() for line in quickstart.splitlines()}
    ci = [line.strip() for line in text_of(".ci/run").splitlines() if line.startswith("python -m pytest")]
    assert ci and set(ci) <= shown, f".ci/run runs {ci}; README's quickstart shows {shown}"
    assert "python lsrm.py train" in shown


def test_the_tutorial_shows_the_code_of_every_equation_row():
    """Each name in the code column of README's paper-to-code table (rows of an equation or of Algorithm 1)
    appears in tutorial.md, and each code expression there appears in one of the tutorial's code excerpts."""
    readme, tutorial = text_of("README.md"), text_of("tutorial.md")
    excerpts = "\n".join(re.findall(r"^```python\n(.*?)^```", tutorial, flags=re.S | re.M))
    rows = [r for r in readme.splitlines() if re.match(r"\| (eq\.|Alg|Algorithm)", r)]
    assert len(rows) >= 10
    missing = []
    for row in rows:
        for name in re.findall(r"`([^`]+)`", row.split("|")[3]):
            if "/" in name or re.match(r"(lsrm|train)\.", name):
                continue                             # a file, or a config key
            where = excerpts if "(" in name else tutorial
            if name not in where:
                missing.append(name)
    assert not missing, f"README's table names code the tutorial does not show: {missing}"
