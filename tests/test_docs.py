"""The documentation: a page per method, generated references that match the code, a strict build, and code
comments that cite only what is in the repository."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from kdcli.methods import method_names
from kdcli.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_method_has_a_page_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in method_names():
        if name.startswith("throwaway"):  # the architecture test's temporary method
            continue
        page = DOCS / "methods" / f"{name}.md"
        assert page.is_file(), f"no docs/methods/{name}.md"
        text = page.read_text()
        assert "\\[" in text and "## Defaults and their sources" in text, f"{name}: formula and defaults"
        assert f"methods/{name}.md" in nav, f"{name} is not in mkdocs.yml's nav"


def test_every_recipe_key_is_in_the_recipe_reference() -> None:
    reference = (DOCS / "reference" / "recipe.md").read_text()
    hints = typing.get_type_hints(Recipe)
    for field in dataclasses.fields(Recipe):
        section = next((a for a in [hints[field.name], *typing.get_args(hints[field.name])]
                        if dataclasses.is_dataclass(a)), None)
        keys = [f"{field.name}.{inner.name}" for inner in dataclasses.fields(section)] if section else [field.name]
        for key in keys:
            assert f"`{key}`" in reference, key


def test_the_generated_references_are_current() -> None:
    generator = _generator()
    stale = [str(path.relative_to(ROOT)) for path, text in generator.expected().items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, f"out of date (run python docs/generate.py): {stale}"
    cli = (DOCS / "reference" / "cli.md").read_text()
    for command in ("train-teacher", "distill", "evaluate", "report", "probe", "bench data"):
        assert f"## `kdcli {command}`" in cli


def test_the_docs_build_strictly() -> None:
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(ROOT / ".site-test")],
                            cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    import shutil

    shutil.rmtree(ROOT / ".site-test", ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((ROOT / "mkdocs.yml").read_text().split("extra_javascript")[0])["strict"] is True


OUTSIDE = re.compile(r"/work/|shared/|specs?/|\bspec\b|\bspec's\b|§|\bdecisions? \d|\(A\d\)|\bA\d\)")


def test_no_comment_in_the_package_points_outside_the_repository() -> None:
    offenders = []
    for path in sorted((ROOT / "kdcli").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code, _, comment = line.partition("#")
            text = comment if not ('"""' in line or line.strip().startswith(("'", '"'))) else line
            if OUTSIDE.search(text) and "find_spec" not in line and "ZOO_SPECS" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_readme_links_to_the_docs() -> None:
    assert "docs/index.md" in (ROOT / "README.md").read_text()
