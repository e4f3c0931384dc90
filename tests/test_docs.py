"""The documentation site: every public name documented exactly once, every option
of the command listed, every page in the navigation, and the tutorials' code runs.

The site itself is built by `mkdocs build --strict` (`.ci/run`); these checks need
no documentation tools, so they run with the rest of the suite.
"""

import argparse
import collections
import contextlib
import importlib.util
import inspect
import io
import pathlib
import re
import types

import numpy as np
import pytest

import eqx_steps as es
from eqx_steps import cli
from eqx_steps.cli import runs as cli_runs


ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
# Documented beyond the exported names: the type a public function returns.
RETURN_TYPES: set[str] = set()
# Documented so that the signatures that use them link to them.
SIGNATURE_TYPES = {
    f"eqx_steps.steps.{name}"
    for name in ("Batch", "Criterion", "MetricsFn", "AxisName", "PostFn")
}
TINY_TRAIN = [
    "--depth", "3", "--filters", "8", "--patch", "16", "--train-size", "64",
    "--test-size", "16", "--batch-size", "8", "--epochs", "1",
]  # fmt: skip


def _load_example(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exported_modules() -> dict[str, types.ModuleType]:
    """The submodules that `eqx_steps/__init__.py` exports as modules."""
    source = inspect.getsource(es)
    return {
        name: getattr(es, name)
        for name in re.findall(r"^\s+(\w+) as \1,$", source, re.MULTILINE)
        if isinstance(getattr(es, name, None), types.ModuleType)
    }


def _module_members(module: types.ModuleType) -> list[str]:
    """The public names of an exported module: for a package, everything its
    `__init__` lists; for a module, what it defines (functions, classes) and its
    upper-case constants, not what it imports."""
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_") or isinstance(obj, types.ModuleType):
            continue
        if hasattr(module, "__path__") or name.isupper():
            names.append(name)
        elif getattr(obj, "__module__", None) == module.__name__:
            names.append(name)
    return names


def _public_names() -> set[str]:
    """Every name a user can reach: `dir(eqx_steps)` minus modules and dunders,
    and the public names of the modules it exports."""
    names = {
        f"eqx_steps.{n}"
        for n in dir(es)
        if not n.startswith("__") and not isinstance(getattr(es, n), types.ModuleType)
    }
    for mod_name, module in _exported_modules().items():
        names |= {f"eqx_steps.{mod_name}.{n}" for n in _module_members(module)}
    # The command's face for scripts (the command itself is not imported by
    # `import eqx_steps`).
    names |= {f"eqx_steps.cli.runs.{n}" for n in _module_members(cli_runs)}
    return names


def _documented() -> collections.Counter:
    """How often each object is rendered by a `::: identifier` line of the API
    pages (the module introductions, with `members: false`, left out)."""
    modules = {f"eqx_steps.{m}" for m in _exported_modules()}
    found = collections.Counter()
    for page in sorted((DOCS / "api").glob("*.md")):
        for ident in re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.MULTILINE):
            if ident not in modules:
                found[ident] += 1
    return found


def test_every_public_name_is_documented_exactly_once():
    public, documented = _public_names(), _documented()
    exported = {n for n in public if n.count(".") == 1}
    assert len(exported) >= 50  # the check sees the real list
    assert sorted(public - set(documented)) == [], "public names not documented"
    not_public = set(documented) - public - RETURN_TYPES - SIGNATURE_TYPES
    assert sorted(not_public) == [], "not public"
    assert {n: c for n, c in documented.items() if c != 1} == {}, "documented twice"


def test_module_introductions_are_on_the_api_pages():
    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    for name in _exported_modules():
        assert f"::: eqx_steps.{name}\n" in text, name


def _cli_sections() -> dict[str, str]:
    """The CLI page cut at its `## `eqx-steps NAME`` headings."""
    text = (DOCS / "api" / "cli.md").read_text()
    parts = re.split(r"^## `eqx-steps (\w+)`\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_page_lists_every_subcommand_and_option():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sections = _cli_sections()
    assert set(sections) == set(sub.choices), "one section per subcommand"
    for name, command in sub.choices.items():
        rows = re.findall(r"^\| `([^`]+)` \|", sections[name], re.MULTILINE)
        listed = {word for row in rows for word in re.split(r"[ ,]+", row)}
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings or [action.metavar or action.dest]:
                assert flag in listed, f"eqx-steps {name} {flag} not on the CLI page"


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") :]
    return re.findall(r"^\s+- (?:[^:\n]+: )?([\w/.-]+\.md)\s*$", nav, re.MULTILINE)


def test_navigation_holds_every_page_once():
    pages = _nav_pages()
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(pages) == on_disk
    for required in (
        "index.md",
        "tutorials/denoiser.md",
        "tutorials/own-loop.md",
        "tutorials/classify-digits.md",
        "distributed.md",
        "migrating-from-scico.md",
        "coming-from-equinox.md",
        "performance.md",
        "architecture.md",
    ):
        assert required in pages


def test_snippets_and_pictures_exist():
    """Every `--8<--` include names an example file (and a marked section of it),
    and every picture a page shows is in docs/."""
    includes, pictures = 0, 0
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        for path, section in re.findall(r'^--8<-- "([^":]+)(?::(\w+))?"', text, re.M):
            source = (ROOT / path).read_text()
            if section:
                assert f"# --8<-- [start:{section}]" in source, (path, section)
                assert f"# --8<-- [end:{section}]" in source, (path, section)
            includes += 1
        for image in re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", text):
            assert (page.parent / image).resolve().is_file(), (page, image)
            pictures += 1
    assert includes >= 6 and pictures >= 4


# --- the tutorials' code ------------------------------------------------------


def _page_commands(page: str) -> list[list[str]]:
    """The `eqx-steps ...` lines of a page's bash blocks, as argument lists."""
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    return [
        line.split()[1:]
        for block in blocks
        for line in block.splitlines()
        if line.startswith("eqx-steps ")
    ]


@pytest.mark.slow
def test_denoiser_tutorial_commands_run(tmp_path):
    """The page's `eqx-steps` commands, in order, with tiny training settings."""
    commands = _page_commands("tutorials/denoiser.md")
    assert [c[0] for c in commands] == ["train", "evaluate", "info"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for argv in commands:
            argv = [a.replace("runs/", f"{tmp_path}/") for a in argv]
            extra = TINY_TRAIN if argv[0] == "train" else []
            assert cli.main(argv + extra) == 0
    text = out.getvalue()
    assert "improvement" in text and (tmp_path / "denoiser" / "curves.png").exists()


@pytest.mark.slow
def test_denoiser_tutorial_script_runs(tmp_path):
    picture = tmp_path / "before-after.png"
    # No PHOTO: the crop of kodim23 shipped in examples/data/.
    figures = _load_example("train_denoiser").main(
        ["--epochs", "1", "--train-size", "64", "--test-size", "16",
         "--depth", "3", "--filters", "8", "--picture", str(picture)]
    )  # fmt: skip
    assert set(figures) == {"noisy", "trained here", "SCICO 6M"}
    assert all(np.isfinite(v).all() for v in figures.values())
    # SCICO's pretrained denoiser cleans the photograph well (kodim23: +10 dB).
    assert figures["SCICO 6M"][1] > figures["noisy"][1] + 3
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shape = es.images.read_image(picture).shape
    assert shape[1] > 3 * shape[0] and shape[2] == 3  # four panels side by side


@pytest.mark.slow
def test_own_loop_tutorial_runs():
    result = _load_example("own_loop").main(steps=4, batch_size=8, n_train=64)
    after, reloaded = result["after"], result["reloaded"]
    assert np.isfinite(float(after["loss"])) and np.isfinite(result["noisy_snr"])
    # The model file gives back exactly the trained model.
    assert {k: float(v) for k, v in after.items()} == {
        k: float(v) for k, v in reloaded.items()
    }


def test_digits_tutorial_includes_the_tested_example():
    # tests/test_examples.py runs examples/classify_digits.py; the page shows it.
    text = (DOCS / "tutorials" / "classify-digits.md").read_text()
    assert '--8<-- "examples/classify_digits.py"' in text
