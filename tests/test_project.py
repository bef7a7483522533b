"""The repository around the code: guides (links, runnable snippets, no local paths), the
README's notes, .gitignore, the pytest summary, and the build's persistent object folder."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
GUIDES = sorted(
    [os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md")]
    + [os.path.join(ROOT, "README.md")]
)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    body = re.sub(r"```.*?```", "", read(path), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", body, flags=re.M)}


def links(path: str) -> list[str]:
    body = re.sub(r"```.*?```", "", read(path), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", body)


@pytest.mark.parametrize("guide", GUIDES, ids=os.path.basename)
def test_relative_links_resolve(guide):
    """Every relative link names a file of the repository and, with #anchor, a heading of it."""
    bad = []
    for link in links(guide):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(guide), target)) if target else guide
        if not os.path.exists(path) or not path.startswith(ROOT + os.sep):
            bad.append(f"{link}: no file {path}")
        elif anchor and path.endswith(".md") and anchor not in anchors(path):
            bad.append(f"{link}: no heading #{anchor} in {os.path.relpath(path, ROOT)}")
    assert not bad, bad


@pytest.mark.parametrize("guide", GUIDES, ids=os.path.basename)
def test_guides_name_no_local_paths_or_missing_sections(guide):
    text = read(guide)
    assert not re.findall(r"/tmp/\S+|/home/\S+|/work/\S+", text)
    assert "README section" not in text  # point to a file that has the section


def python_blocks(path: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", read(path), flags=re.S)


def test_lightning_guide_snippets_are_self_contained_and_run(tmp_path, monkeypatch):
    """Each ``python`` block of docs/lightning.md runs on its own: every name it uses is
    imported or defined in it."""
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("matplotlib")
    import torch  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)  # Trainer logs, plots
    threads = torch.get_num_threads()
    blocks = python_blocks(os.path.join(DOCS, "lightning.md"))
    assert len(blocks) >= 3
    try:
        for i, code in enumerate(blocks):
            namespace: dict[str, object] = {"__name__": f"lightning_md_block_{i}"}
            exec(compile(code, f"docs/lightning.md, python block {i}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_readme_says_the_demo_figures_depend_on_the_cpu():
    """The demo table is followed by a note naming the machine and what moves between CPUs."""
    text = read(os.path.join(ROOT, "README.md"))
    table_end = text.index("(e) adaptive   0.02018")
    note = text[table_end : table_end + 1500]
    assert "model name" in note and "Intel(R) Xeon(R)" in note
    assert "99.6%" in note and "0.0605..2" in note  # the figures another x86 machine gave


def test_demo_output_folder_is_ignored_by_git():
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(
        os.path.join(ROOT, ".git")
    ):
        pytest.skip("not a git checkout")
    for path in ("gradstab_demo/a_vanishing_heatmap.png", "gradstab_report/total_norm.png"):
        out = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=ROOT, check=False, capture_output=True
        )
        assert out.returncode == 0, f"{path} is not ignored by .gitignore"


def test_pytest_folds_the_gpu_skips_into_one_line(tmp_path):
    """``-ra`` lists one line for all "needs a CUDA device" skips; other skips as usual."""
    with open(os.path.join(ROOT, "tests", "conftest.py"), encoding="utf-8") as fh:
        (tmp_path / "conftest.py").write_text(fh.read())
    (tmp_path / "test_mixed.py").write_text(
        textwrap.dedent(
            """
            import pytest
            gpu = pytest.mark.skipif(True, reason="needs a CUDA device")

            @gpu
            def test_a(): pass

            @gpu
            @pytest.mark.parametrize("x", [1, 2])
            def test_b(x): pass

            def test_c(): pytest.skip("needs CUDA")

            def test_other(): pytest.skip("another reason")

            @pytest.mark.skipif(True, reason="a third reason")
            def test_third(): pass
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-ra", "-q", "-p", "no:cacheprovider", "test_mixed.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    summary = [ln for ln in out.stdout.splitlines() if ln.startswith("SKIPPED")]
    gpu = [ln for ln in summary if "CUDA" in ln]
    assert len(gpu) == 1 and gpu[0].startswith("SKIPPED [4] conftest.py"), out.stdout
    assert "needs a CUDA device" in gpu[0]
    assert any("another reason" in ln for ln in summary)
    assert any("a third reason" in ln for ln in summary)
    assert len(summary) == 3, out.stdout


def test_setup_compiles_into_a_persistent_build_folder(tmp_path, monkeypatch):
    """setuptools' editable install points build_temp at a fresh temporary folder; setup.py
    moves it to build/ in the source tree, so a second ``pip install -e`` reuses ninja's
    objects."""
    pytest.importorskip("setuptools")
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("GRADSTAB_BUILD_TEMP", raising=False)
    monkeypatch.delenv("GRADSTAB_NO_EXT", raising=False)
    setup = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="gradstab_setup_test")
    _, cmdclass = setup["_extensions"]()
    from setuptools import Distribution  # noqa: PLC0415

    dist = Distribution({"name": "gradstab", "ext_modules": [], "cmdclass": cmdclass})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_temp = str(tmp_path / "fresh-temporary-folder")  # what editable_wheel does
    cmd.ensure_finalized()
    expected = setup["persistent_build_temp"](torch.__version__)
    assert cmd.build_temp == expected
    assert expected.startswith(os.path.join(ROOT, "build") + os.sep)
    assert torch.__version__.split("+")[0] in expected  # one folder per torch
    monkeypatch.setenv("GRADSTAB_BUILD_TEMP", str(tmp_path / "objects"))
    assert setup["persistent_build_temp"](torch.__version__) == str(tmp_path / "objects")
