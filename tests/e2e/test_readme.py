"""The README works from a clean clone: each of its code blocks is tagged, on the line before its fence,
`<!-- readme-test: run -->` or `<!-- readme-test: skip (reason) -->`, and the run blocks execute verbatim, in README
order, in one folder: a copy of the repository's files with no ../shared beside it (REPNAS_SHARED points nowhere),
the copy's packages first on PYTHONPATH. Nothing is changed but the environment (ENV below) and the size flags
appended to some commands (SIZE_FLAGS below). Bash blocks run with `bash -e`, Python blocks with `python -`.

CI seconds: 500 s measured on the project's 2-core CPU box while other jobs shared it (the search block 260 s,
the pruning block 120 s, each other block under 35 s); the test prints each block's seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TAG = re.compile(r"<!-- readme-test: (?:(?P<run>run)|skip \((?P<reason>.+)\)) -->")
RUNNABLE = {"bash": ["bash", "-e", "-o", "pipefail"], "python": [sys.executable, "-"]}

# Appended to the commands that start with the key, before any trailing `# comment`, to keep the run blocks to
# minutes on a 2-core CPU: the README's own values stay in the command and these come last, so they win (argparse
# keeps the last value). Epochs: 2, not 1: after one epoch (40 steps) the seed's BatchNorm statistics are still far
# off, its raw outputs reach 1e5 on some images and taylor importance (`repnas prune`'s default) refuses its NaN loss.
SIZE_FLAGS = {
    "repnas data synth": "--images 40",
    "repnas train": "--epochs 2 --imgsz 64",
    "repnas val": "--imgsz 64",
    "repnas latency": "--imgsz 64 --iters 5",
    "repnas search": "--trials 2 --epochs 2 --latency-imgsz 64",
    "repnas resume": "--trials 2",
    "repnas prune": "--finetune-epochs 1 --imgsz 64",
    "repnas export-model": "--imgsz 64",
}


def readme_blocks(text: str) -> list[dict]:
    """Every fenced block: its line, language, tag (run or the skip reason) and code."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
        assert end is not None, f"README.md line {i + 1}: the code block is not closed"
        tag = TAG.fullmatch(lines[i - 1].strip()) if i else None
        assert tag, (f"README.md line {i + 1}: tag the block on the line before its fence: "
                     "<!-- readme-test: run --> or <!-- readme-test: skip (reason) -->")
        blocks.append({"line": i + 1, "lang": fence.group(1), "run": bool(tag.group("run")),
                       "reason": tag.group("reason"), "code": "\n".join(lines[i + 1:end]) + "\n"})
        i = end + 1
    return blocks


def _split_comment(line: str) -> tuple[str, str]:
    """(command, ` # comment`): the comment is the first `#` after a blank outside quotes."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and k and line[k - 1].isspace():
            return line[:k].rstrip(), "  " + line[k:]
    return line.rstrip(), ""


def with_size_flags(code: str) -> str:
    """`code` with SIZE_FLAGS appended to each command they name (a command continued with `\\` gets them on its
    last line)."""
    out, command = [], ""
    for line in code.splitlines():
        command = command or line.strip()
        if line.rstrip().endswith("\\"):
            out.append(line)
            continue
        flags = next((f for prefix, f in SIZE_FLAGS.items() if re.match(re.escape(prefix) + r"(\s|$)", command)), "")
        if flags:
            head, comment = _split_comment(line)
            line = f"{head} {flags}{comment}"
        out.append(line)
        command = ""
    return "\n".join(out) + "\n"


def test_size_flags_go_before_the_comment_and_on_a_continued_command_last_line():
    code = ("repnas train seed --epochs 30   # writes results/train/seed/\n"
            "repnas prune a.yaml --weights w.pt \\\n    --importance l1   # a '#' comment\n"
            "repnas show default\n")
    assert with_size_flags(code).splitlines() == [
        f"repnas train seed --epochs 30 {SIZE_FLAGS['repnas train']}  # writes results/train/seed/",
        "repnas prune a.yaml --weights w.pt \\",
        f"    --importance l1 {SIZE_FLAGS['repnas prune']}  # a '#' comment",
        "repnas show default",
    ]


def test_every_readme_block_is_tagged_and_no_run_block_needs_shared():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert any(b["run"] for b in blocks)
    for b in blocks:
        if b["run"]:
            assert b["lang"] in RUNNABLE, f"README.md line {b['line']}: a run block must be bash or python"
            assert "../shared" not in b["code"], f"README.md line {b['line']}: a clone has no ../shared"
        else:
            assert b["reason"].strip(), f"README.md line {b['line']}: a skip needs its reason"


def _copy_repository(dest: Path) -> None:
    """The repository's files as a clone would have them (tracked, or new and not ignored), else a plain copy."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", "results", "__pycache__", "*.egg-info",
                                                                  ".*_cache", ".hypothesis"))
        return
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _new_files(root: Path, before: set[Path]) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in before
                  and "__pycache__" not in p.parts and p.parts[len(root.parts)] != "results")


@pytest.mark.slow
def test_readme_run_blocks_work_from_a_clean_clone(tmp_path):
    if shutil.which("repnas") is None:
        pytest.skip("the repnas command is not installed: pip install -e .")
    clone = tmp_path / "repnas"  # tmp_path holds no `shared`: ../shared is absent, as in a clone
    clone.mkdir()
    _copy_repository(clone)
    copied = set(clone.rglob("*"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPNAS_CACHE_DIR": str(tmp_path / "cache"),
           "REPNAS_SHARED": str(tmp_path / "no-shared"), "PYTHONPATH": str(clone), "PYTHONDONTWRITEBYTECODE": "1"}
    start, timings = time.perf_counter(), []
    for block in readme_blocks((clone / "README.md").read_text(encoding="utf-8")):
        if not block["run"]:
            continue
        code = with_size_flags(block["code"]) if block["lang"] == "bash" else block["code"]
        began = time.perf_counter()
        done = subprocess.run(RUNNABLE[block["lang"]], input=code, cwd=clone, env=env, text=True,
                              capture_output=True, timeout=1800)
        timings.append((block["line"], time.perf_counter() - began))
        assert done.returncode == 0, (f"README.md block at line {block['line']} exited {done.returncode}:\n{code}\n"
                                      f"--- stdout (end) ---\n{done.stdout[-3000:]}\n--- stderr (end) ---\n"
                                      f"{done.stderr[-3000:]}")
    print("README run blocks: " + ", ".join(f"line {line} {s:.0f} s" for line, s in timings)
          + f"; {time.perf_counter() - start:.0f} s in all")
    assert _new_files(clone, copied) == [], "README commands must write under results/"
