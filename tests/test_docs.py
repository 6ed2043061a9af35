"""The manual stays honest: links resolve, the README's job table runs, no stale citations.

- every relative link in README.md and docs/**/*.md points at an existing file, and an ``#anchor``
  into a markdown file at an existing heading (GitHub's slug rules);
- every ``python ...`` command in the README's job table runs: argparse tools with ``--help`` (and
  each ``--flag`` the table shows is in that help), Hydra entry points with ``--cfg job`` and the
  table's overrides (composes the config without training);
- no page names or cites the old per-task notes;
- every repository path (``cgpt/...py``, ``train/...py``, ``conf/...yaml``, ...) and every dotted
  ``cgpt.module.name`` a page mentions exists (a rename in the code shows up here);
- the README names every console script of ``pyproject.toml``;
- the README has at most 300 lines.

The checkers are plain functions, tested on small inputs below so that each can be seen to fail.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 300
# Entry points that are Hydra apps: prove the table's overrides compose with --cfg job.
HYDRA_SCRIPTS = {"train/pretrain.py", "train/finetune.py"}
# Citations of the old per-task notes that must not come back.
FORBIDDEN = [re.compile(r"issue-", re.I), re.compile(r"docs/notes"), re.compile(r"\bissue\s+#?\d", re.I)]
SUBPROCESS_TIMEOUT_S = 120


def doc_files() -> list[Path]:
    """README.md and every markdown page under docs/."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


# ---------------------------------------------------------------------------------------------
# Markdown: headings, slugs, links


FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a bash block is no heading)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)  # inline HTML
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.strip().lower()
    kept = [ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN"]
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown page, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[str]:
    """Targets of inline markdown links outside code blocks and inline code."""
    targets = []
    for line in prose_lines(text):
        line = re.sub(r"`[^`]*`", "", line)
        targets.extend(LINK.findall(line))
    return targets


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file, or whose ``#anchor`` in a markdown file, is missing."""
    problems = []
    text = page.read_text(encoding="utf-8")
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = page if not path_part else (page.parent / path_part).resolve()
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} missing")
            continue
        if anchor and dest.is_file() and dest.suffix == ".md":
            if anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


# ---------------------------------------------------------------------------------------------
# Names of code: paths and dotted cgpt names must exist

CODE_PATH = re.compile(r"(?<![\w/.-])((?:cgpt|train|tests|conf|data|bench|slurm)/[\w./-]*\.(?:py|yaml))")
DOTTED = re.compile(r"(?<![\w./-])(cgpt(?:\.\w+)+)")
NAMED_TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+)")  # a claim that names the test backing it


def top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (what ``module.name`` may refer to)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return base / "__init__.py" if (base / "__init__.py").is_file() else None


def stale_code_names(text: str) -> list[str]:
    """Repository paths and dotted ``cgpt.`` names in ``text`` that do not exist."""
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        for path in CODE_PATH.findall(line):
            if not any(ch in path for ch in "*<{") and not (ROOT / path).exists():
                problems.append(f"line {n}: {path} does not exist")
        for path, test in NAMED_TEST.findall(line):
            if (ROOT / path).is_file() and test not in top_level_names(ROOT / path):
                problems.append(f"line {n}: {path} has no {test}")
        for dotted in DOTTED.findall(line):
            parts = dotted.split(".")
            depth = next((i for i in range(len(parts), 0, -1) if module_file(parts[:i])), 0)
            if depth == 0:
                problems.append(f"line {n}: {dotted}: no such module")
            elif depth < len(parts) and parts[depth] not in top_level_names(module_file(parts[:depth])):
                problems.append(f"line {n}: {dotted}: {'.'.join(parts[:depth])} has no {parts[depth]}")
    return problems


def console_scripts() -> list[str]:
    """The ``[project.scripts]`` names of pyproject.toml (read as text: tomllib is Python 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    return re.findall(r"^([\w-]+)\s*=", section.group(1), re.M) if section else []


# ---------------------------------------------------------------------------------------------
# The README's job table


def job_table_commands(readme_text: str) -> list[str]:
    """The ``python ...`` commands in the command column of the README's job table."""
    lines = readme_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Every job at a glance"))
    commands = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] == "command":
            continue
        commands += [span for span in re.findall(r"`([^`]+)`", cells[1]) if span.startswith("python ")]
    return commands


def first_sweep_point(overrides: list[str]) -> list[str]:
    """Hydra refuses ``--cfg`` with ``-m``: compose a sweep's first point (``lr=1e-3,3e-3`` -> ``lr=1e-3``)."""
    if "-m" not in overrides and "--multirun" not in overrides:
        return overrides
    point = []
    for override in overrides:
        if override in ("-m", "--multirun"):
            continue
        key, eq, value = override.partition("=")
        if eq and "," in value and not re.search(r"[\[\](){}'\"]", value):
            value = value.split(",")[0]
        point.append(f"{key}{eq}{value}")
    return point


def check_invocation(command: str) -> tuple[list[str], list[str]]:
    """What to run to check a table command, and the ``--flags`` its ``--help`` must mention.

    ``python X.py ARGS`` -> ``X.py --help`` (plus leading subcommand words such as ``to-hf``);
    ``python -m mod ARGS`` likewise; a Hydra entry point -> ``X.py <overrides> --cfg job``.
    """
    words = shlex.split(command)
    assert words[0] == "python", command
    if words[1] == "-m":
        target, rest = ["-m", words[2]], words[3:]
    else:
        target, rest = [words[1]], words[2:]
    if target[0] in HYDRA_SCRIPTS:
        return [sys.executable, *target, *first_sweep_point(rest), "--cfg", "job"], []
    subcommands = []
    for word in rest:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        subcommands.append(word)
    flags = sorted({word.split("=")[0] for word in rest if word.startswith("--")})
    return [sys.executable, *target, *subcommands, "--help"], flags


# ---------------------------------------------------------------------------------------------
# The manual itself


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_cites_the_old_per_task_notes(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    hits = [
        f"line {n}: {line.strip()}"
        for n, line in enumerate(text.splitlines(), 1)
        if any(p.search(line) for p in FORBIDDEN)
    ]
    assert hits == []


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_path_and_cgpt_name_exists(page: Path) -> None:
    assert stale_code_names(page.read_text(encoding="utf-8")) == []


def test_readme_names_every_console_script() -> None:
    scripts = console_scripts()
    assert len(scripts) >= 6, scripts
    readme = README.read_text(encoding="utf-8")
    assert [s for s in scripts if f"`{s}`" not in readme] == []


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_old_notes_folder_is_gone() -> None:
    assert not (ROOT / "docs" / "notes").exists()


def test_the_job_table_lists_the_entry_points() -> None:
    commands = " ".join(job_table_commands(README.read_text(encoding="utf-8")))
    for entry in [
        "data/prepare.py",
        "train/pretrain.py",
        "train/finetune.py",
        "train/evaluate.py",
        "train/generate.py",
        "train/convert.py",
        "train/consolidate.py",
        "train/plan.py",
        "train/scaling_study.py",
        "train/mutransfer.py",
        "train/collect.py",
        "slurm/submit.py",
        "-m cgpt.lora merge",
        "-m cgpt.lm_eval_adapter",
    ]:
        assert entry in commands, f"the README's job table has no command for {entry}"


TABLE_COMMANDS = job_table_commands(README.read_text(encoding="utf-8"))


def run_check(command: str) -> tuple[list[str], int, str, list[str]]:
    """Run one table command's check: (argv, exit status, output, flags its help does not mention)."""
    argv, flags = check_invocation(command)
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    missing = [flag for flag in flags if flag not in output]
    if proc.returncode == 0 and missing and re.search(r"^\s+run\s", output, re.M):
        # lm-eval >= 0.4.10 lists its flags under its default `run` command (the adapter is its CLI).
        argv = [*argv[:-1], "run", "--help"]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        output = proc.stdout + proc.stderr
        missing = [flag for flag in flags if flag not in output]
    return argv, proc.returncode, output, missing


@pytest.fixture(scope="module")
def table_checks() -> dict[str, tuple[list[str], int, str, list[str]]]:
    """All table commands checked at once, a few at a time (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(TABLE_COMMANDS, pool.map(run_check, TABLE_COMMANDS)))


@pytest.mark.slow
@pytest.mark.parametrize("command", TABLE_COMMANDS)
def test_every_job_table_command_runs(command: str, table_checks: dict) -> None:
    argv, returncode, output, missing = table_checks[command]
    assert returncode == 0, f"{' '.join(argv[1:])} exited {returncode}:\n{output[-3000:]}"
    assert missing == [], f"{' '.join(argv[1:])} does not mention {missing}"


# ---------------------------------------------------------------------------------------------
# The checkers can fail


def test_slug_follows_github() -> None:
    assert (
        github_slug("`init_from`: what it accepts and what it checks") == "init_from-what-it-accepts-and-what-it-checks"
    )
    assert github_slug("Scaling out: strategies, checkpoints, resume") == "scaling-out-strategies-checkpoints-resume"
    assert github_slug("muP (Cerebras-GPT-muP)") == "mup-cerebras-gpt-mup"
    assert github_slug("`finetune.yaml`") == "finetuneyaml"
    assert github_slug("hydra/launcher") == "hydralauncher"


def test_headings_inside_code_blocks_are_not_anchors() -> None:
    text = "# Title\n\n```bash\n# a comment\n```\n\n## Part\n\n## Part\n"
    assert anchors(text) == {"title", "part", "part-1"}


def test_broken_links_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#a-section) [ok](#page) [web](https://example.com/x.md)\n"
        "`[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [self](#nope)\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert problems[0].startswith("missing.md")
    assert "#nowhere" in problems[1]
    assert "#nope" in problems[2]


def test_job_table_parsing_and_invocations() -> None:
    readme = (
        "## Every job at a glance\n\n| job | command | guide |\n|---|---|---|\n"
        "| a | `python train/pretrain.py model=x data.dir=D` | g |\n"
        "| b | `python train/convert.py to-hf CKPT OUT --dtype bfloat16` / `make x` | g |\n"
        "| c | `python -m cgpt.lora merge BASE --out merged/` | g |\n"
        "| d | `python train/pretrain.py -m optim.lr=1e-3,3e-3 'x=[1,2]'` | g |\n\n"
        "## Next\n| x | `python no.py` | y |\n"
    )
    commands = job_table_commands(readme)
    assert commands == [
        "python train/pretrain.py model=x data.dir=D",
        "python train/convert.py to-hf CKPT OUT --dtype bfloat16",
        "python -m cgpt.lora merge BASE --out merged/",
        "python train/pretrain.py -m optim.lr=1e-3,3e-3 'x=[1,2]'",
    ]
    assert check_invocation(commands[0]) == (
        [sys.executable, "train/pretrain.py", "model=x", "data.dir=D", "--cfg", "job"],
        [],
    )
    assert check_invocation(commands[1]) == ([sys.executable, "train/convert.py", "to-hf", "--help"], ["--dtype"])
    assert check_invocation(commands[3])[0][2:] == ["optim.lr=1e-3", "x=[1,2]", "--cfg", "job"]
    assert check_invocation(commands[2]) == ([sys.executable, "-m", "cgpt.lora", "merge", "--help"], ["--out"])


def test_stale_code_names_are_caught() -> None:
    text = (
        "`train/run.py` and `cgpt/scaling.py` are gone; `cgpt.sft.ChatTemplate` moved; `cgpt.nowhere`.\n"
        "`cgpt/weights/loading.py`, `cgpt.weights.load_gpt`, `cgpt.data.sft.ChatTemplate`, `conf/strategy/*.yaml`,\n"
        "`cgpt.strategies.SPECS` and `cgpt.cli.convert` exist.\n"
        "`tests/test_resume.py::test_resume_prefers_complete_last_then_newest_complete_step` backs a claim;\n"
        "`tests/test_resume.py::test_that_was_renamed` does not.\n"
    )
    problems = stale_code_names(text)
    assert len(problems) == 5, problems
    assert "tests/test_resume.py has no test_that_was_renamed" in problems[4]
    assert "train/run.py" in problems[0] and "cgpt/scaling.py" in problems[1]
    assert "cgpt.sft has no ChatTemplate" in problems[2] and "cgpt has no nowhere" in problems[3]


def test_forbidden_citations_are_caught() -> None:
    for line in ["see docs/notes/issue-8.md", "as issue 5 found", "Issue #3", "issue-2"]:
        assert any(p.search(line) for p in FORBIDDEN), line
    assert not any(p.search("a known issue with lm-eval") for p in FORBIDDEN)
