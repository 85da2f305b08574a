"""The docs stay true: README.md and docs/*.md link to files and anchors that exist, name repo files
that exist, name only config keys the trainer has (trainer/config.py), only trainer options
`python -m trainer.train --help` lists, and only inputs the nodes' schemas have; each docs page
opens with what the reader can do with it; the README stays short; every template has its
screenshot, made from the template as it is now (scripts/make_docs_images.py, `make docs`)."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
REPO_DIRS = ("trainer/", "hywu_nodes/", "scripts/", "bench/", "tests/", "example_workflows/", "docs/")
CONFIG_SECTIONS = ("base", "data", "generator", "train")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, seen, fence = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def prose(page: Path) -> str:
    """The page without its fenced code blocks (commands there are shown, not linked)."""
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.name}: {target} (no such anchor)")
    return bad


def test_pages_exist_and_the_readme_is_short():
    assert len(PAGES) >= 8
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines (at most 250; the rest belongs in docs/)"


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.name)
def test_each_docs_page_opens_with_its_purpose(page):
    lines = [line for line in page.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{page.name}: no title"
    first = lines[1]
    assert not first.startswith(("#", "|", "-", "```")) and len(first) > 40, \
        f"{page.name}: the first paragraph should say what the reader can do with the page"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_anchors_resolve(page):
    assert not broken_links(page)


def test_a_broken_link_is_caught(tmp_path):
    """The check itself: a scratch copy of README.md with one link broken fails it."""
    for entry in REPO.iterdir():  # the checkout as it is, but for the page under test
        if entry.name != "README.md":
            (tmp_path / entry.name).symlink_to(entry)
    page = tmp_path / "README.md"
    page.write_text((REPO / "README.md").read_text().replace("(docs/nodes.md)", "(docs/nodez.md)", 1)
                    .replace("(docs/comfyui.md)", "(docs/comfyui.md#no-such-heading)", 1))
    assert sorted(broken_links(page)) == ["README.md: docs/comfyui.md#no-such-heading (no such anchor)",
                                          "README.md: docs/nodez.md (no such file)"]


def _named_paths(page: Path):
    for span in CODE.findall(page.read_text()):
        for word in span.split():
            word = word.strip(",;:()")
            if word.startswith(REPO_DIRS) and not re.search(r"[<>*{}$]|\.\.\.", word):
                word = word.split("::")[0].split("#")[0]
                # scripts/hywu_demo_core.build_world: a function of scripts/hywu_demo_core.py
                m = re.fullmatch(r"(.+/\w+)\.(\w+)", word)
                yield f"{m.group(1)}.py" if m and (REPO / f"{m.group(1)}.py").is_file() else word


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_files_the_docs_name_exist(page):
    missing = sorted({p for p in _named_paths(page) if not (REPO / p.rstrip("/")).exists()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def _config_keys() -> set[str]:
    from trainer.config import TrainConfig

    keys = set()

    def walk(prefix, d):
        for k, v in d.items():
            keys.add(f"{prefix}{k}")
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)

    walk("", TrainConfig().to_dict())
    return keys


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_config_keys_the_docs_name_exist(page):
    keys = _config_keys()
    named = set()
    for span in CODE.findall(page.read_text()):
        for m in re.finditer(r"(?<![\w./-])-{0,2}((?:%s)\.[a-z_]+(?:\.[a-z_]+)*)" % "|".join(CONFIG_SECTIONS), span):
            named.add(m.group(1))
    unknown = sorted(k for k in named if k not in keys)
    assert not unknown, f"{page.name} names config keys the trainer does not have: {unknown}"


@pytest.fixture(scope="module")
def trainer_options() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "trainer.train", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return set(re.findall(r"(--[a-z][a-z-]*)", out))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_trainer_options_the_docs_name_exist(page, trainer_options):
    named = set()
    for line in page.read_text().splitlines():  # a line that names the trainer, or lists its options
        if "trainer.train" in line or line.startswith("Options:"):
            named |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)(?=[\s=`]|$)", line))
    known = trainer_options | {"--config_file", "--nproc_per_node"}  # accelerate launch / torchrun
    unknown = sorted(o for o in named if o not in known and not o.startswith(("--data.", "--train.", "--base.",
                                                                                 "--generator.")))
    assert not unknown, f"{page.name} names trainer options that --help does not list: {unknown}"


def schema_names() -> dict[str, set[str]]:
    """{node_id: its input and output names}, read from the V3 schemas in hywu_nodes/nodes/*.py."""
    out = {}
    for src in sorted((REPO / "hywu_nodes" / "nodes").glob("*.py")):
        text = src.read_text()
        for m in re.finditer(r'node_id="(HYWU\w+)"(.*?)(?=node_id=|\Z)', text, flags=re.S):
            body = m.group(2)
            out[m.group(1)] = (set(re.findall(r'\.Input\(\s*"(\w+)"', body))
                               | set(re.findall(r'\.Output\(\s*display_name="(\w+)"', body)))
    return out


def test_node_inputs_the_docs_name_exist():
    """docs/nodes.md: under each node's heading, every `- **name**` entry is one of its inputs or outputs."""
    named = {}
    for line in (REPO / "docs" / "nodes.md").read_text().splitlines():
        m = re.match(r"### .*\(`(HYWU\w+)`\)", line)
        if m:
            node = m.group(1)
            named[node] = set()
        elif re.match(r"#{1,3} ", line):
            node = None
        elif line.startswith("- **") and named and node:
            named[node] |= set(re.findall(r"\*\*([a-z_]+)\*\*", line.split(" (")[0].split(":")[0]))
    schemas = schema_names()
    assert set(named) == set(schemas) == {"HYWULoadGenerator", "HYWUConditionEncode", "HYWUGenerateLoRA",
                                          "HYWUApplyGeneratedLoRA"}
    assert all(named.values()), named
    for node, names in named.items():
        unknown = sorted(names - schemas[node])
        assert not unknown, f"docs/nodes.md, {node}: {unknown} are not inputs or outputs of the node"


def test_every_template_has_a_current_screenshot():
    """docs/images/template_<name>.png for every shipped template, made from the template as it is now
    (the PNG records the sha256 of the UI workflow it shows; `make docs` remakes them)."""
    from PIL import Image

    sys.path.insert(0, str(REPO / "example_workflows"))
    try:
        import build_api
    finally:
        sys.path.pop(0)
    for name, title in build_api.TITLES.items():
        shot = REPO / "docs" / "images" / f"template_{name}.png"
        assert shot.is_file(), f"{shot.name} missing: run make docs"
        digest = hashlib.sha256((REPO / "example_workflows" / f"{title}.json").read_bytes()).hexdigest()
        assert Image.open(shot).text.get("hywu_workflow_sha256") == digest, f"{shot.name} is stale: run make docs"
