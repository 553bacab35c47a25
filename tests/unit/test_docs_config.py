"""The docs cannot drift: configuration.md is what the generator makes now,
the docs index lists every page, and the links of the pages we own resolve."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from daemon import config as config_mod

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GENERATOR = ROOT / "tools" / "gen_config_docs.py"
LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")
# Pages whose links this test checks (the others' owners check theirs).
CHECKED_PAGES = ("README.md", "architecture.md", "configuration.md", "operations.md")


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclass looks its own module up while defined.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def example_text() -> str:
    return (ROOT / "config.example.toml").read_text()


def test_configuration_page_is_what_the_generator_makes(gen, example_text):
    current = (DOCS / "configuration.md").read_text()
    assert current == gen.render(example_text), (
        "docs/configuration.md is out of date: run python tools/gen_config_docs.py"
    )


def test_every_key_has_a_row_in_its_table(gen, example_text):
    page = gen.render(example_text)
    for table in config_mod._tables():
        section = page.split(f"### [{table.name}]\n", 1)[1].split("\n### ", 1)[0]
        cls = typing.get_type_hints(config_mod.Config)[table.name]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in section, f"{table.name}.{f.name} has no row"


def test_a_key_missing_from_the_example_is_an_error(gen, example_text):
    without = re.sub(r"(?m)^rss_limit_mb = .*\n", "", example_text)
    with pytest.raises(ValueError, match=r"\[workers\] lacks rss_limit_mb"):
        gen.render(without)


def test_a_key_unknown_to_the_code_is_an_error(gen, example_text):
    extra = example_text.replace("[web]\n", "[web]\n# Old.\nlisten = 1\n", 1)
    with pytest.raises(ValueError, match=r"\[web\] has unknown listen"):
        gen.render(extra)


def test_keys_under_one_comment_share_it_and_a_blank_line_ends_a_group(gen):
    tables = gen.parse_example(
        "[t]\n# First and second.\na = 1\nb = 2\n\nc = 3\n# Own.\nd = 4\n"
    )
    docs = {k.key: k for k in tables["t"]}
    assert docs["a"].comment == "First and second." and docs["a"].shares_with == ""
    assert docs["b"].shares_with == "a"
    assert docs["c"].comment == ""
    assert docs["d"].comment == "Own."


def test_secrets_name_their_env_var_and_file_key(gen, example_text):
    page = gen.render(example_text)
    row = next(line for line in page.splitlines() if line.startswith("| `token` |"))
    assert "`CAMPAIGND_PROVIDER_TOKEN`" in row and "`token_file`" in row
    assert "**Secret.**" in row and "secret; env" not in row


def test_check_mode_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_the_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md lacks {page.name}"


@pytest.mark.parametrize("name", CHECKED_PAGES)
def test_relative_links_resolve(name):
    page = DOCS / name
    for match in LINK.finditer(page.read_text()):
        target = match["target"]
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"docs/{name}: broken link {target}"
