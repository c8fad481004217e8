"""The mutation pass (issue 14): disable one guard at a time in a copy of the repository and see a test fail.

    .venv/bin/python -m tools.mutants [--only ID ...] [--list] [--no-baseline] [--logs DIR]

Each mutation of the catalogue (``tools/mutations.py``) is applied to a fresh copy of the
repository (the working tree is never edited, so others can keep working in it), and
pytest runs the mutation's tests there, stopping at the first failure. One line per
mutation: KILLED (a test failed: the guard is tested), SURVIVED (every test passed:
nothing notices the guard is gone) or ERROR (the run itself broke: no verdict), its
time, and the first failing test. A survivor the catalogue marks ``harmless`` is
reported with its judgement and does not fail the pass.

The copy must be what the tests import, in the pytest process and in every driver
it spawns (some with a stripped environment, through the ``csi-wasm`` console
script). The repository's ``.venv`` imports ``csi_wasm`` from this checkout through
its editable install, so the pass runs in a small venv of its own instead: it sees
``.venv``'s packages but not the editable install, and a ``.pth`` file puts the copy
on ``sys.path``. Before each run the pass checks that ``csi_wasm`` resolves into the
copy from a directory outside it with no ``PYTHONPATH``.

Before the mutations, a baseline run of all the selected tests on an unmutated copy
must pass: otherwise a test that fails anyway would count as killing every mutation.
The exit status is 0 when every mutation was killed or judged harmless, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
# tools/ is a directory of scripts, not a package: the catalogue beside this file is the top-level module
# ``mutations`` (as mypy and tests/test_mutants.py see it), whether this runs as tools.mutants or as a file
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
from mutations import MUTATIONS, Mutation  # noqa: E402
REPO_VENV = ROOT / ".venv"
# What a copy leaves out: the venv, git, caches and build output (none of it is read by the tests).
COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "__pycache__", ".mypy_cache", ".pytest_cache", ".hypothesis", "*.egg-info", "build", "dist",
    "bench-results",
)  # fmt: skip
# A run that outlives this is stopped and reported as an ERROR (pytest-timeout ends one test after 300 s first).
RUN_TIMEOUT_SECONDS = 1800.0
# pytest's short summary: "FAILED <node id> - <message>" (node ids may hold spaces: test_fault[wrong bytes (blob)]);
# read after its heading only, since captured log lines of level ERROR start the same way
_SUMMARY = "short test summary info"
_FIRST_FAILURE = re.compile(r"^(?:FAILED|ERROR) (\S+\.py(?:::.+?)?)(?: - .*)?$", re.MULTILINE)


class CatalogueError(Exception):
    """A mutation cannot be applied as written (its old text moved, or the result is not Python)."""


class IsolationError(Exception):
    """The copy would not be what the tests import."""


def mutated_text(mutation: Mutation, text: str) -> str:
    """``text`` with the mutation applied; CatalogueError unless its old text occurs exactly once."""
    count = text.count(mutation.old)
    if count != 1:
        raise CatalogueError(
            f"{mutation.id}: its old text occurs {count} times in {mutation.file}, expected exactly once "
            "(the code moved: update tools/mutations.py)"
        )
    mutated = text.replace(mutation.old, mutation.new, 1)
    try:
        compile(mutated, mutation.file, "exec")
    except SyntaxError as exc:
        raise CatalogueError(f"{mutation.id}: the mutated {mutation.file} is not valid Python: {exc}") from exc
    return mutated


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / mutation.file
    path.write_text(mutated_text(mutation, path.read_text()))


# -- the isolated interpreter ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    """A venv whose ``csi_wasm`` is the copy at ``tree`` (rebuilt for every mutation at the same path)."""

    venv: Path
    tree: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self) -> dict[str, str]:
        # as scripts/test.sh: the venv's tools first (hadolint, protoc-gen-mypy, mypy), then the system's
        path = f"{self.venv / 'bin'}:{REPO_VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
        return {k: v for k, v in os.environ.items() if k not in drop} | {"PATH": path}


def make_sandbox(base: Path) -> Sandbox:
    venv, tree = base / "venv", base / "tree"
    subprocess.run([str(REPO_VENV / "bin" / "python"), "-m", "venv", "--without-pip", str(venv)], check=True)
    packages = _site_packages(REPO_VENV / "bin" / "python")
    # Plain path lines: the repo venv's own .pth files (its editable install of this checkout) are not run.
    (_site_packages(venv / "bin" / "python") / "csi_wasm_mutants.pth").write_text(f"{tree}\n{packages}\n")
    script = venv / "bin" / "csi-wasm"  # the console script tests run with a stripped environment
    script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom csi_wasm.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return Sandbox(venv, tree)


def _site_packages(python: Path) -> Path:
    answer = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return Path(answer.stdout.strip())


def fresh_copy(sandbox: Sandbox) -> None:
    if sandbox.tree.exists():
        shutil.rmtree(sandbox.tree)
    shutil.copytree(ROOT, sandbox.tree, ignore=COPY_IGNORE, symlinks=True)


def check_isolation(sandbox: Sandbox) -> None:
    """``csi_wasm`` must come from the copy, even from elsewhere and without PYTHONPATH."""
    answer = subprocess.run(
        [str(sandbox.python), "-c", "import csi_wasm, grpc, pytest; print(csi_wasm.__file__)"],
        cwd="/", env=sandbox.env(), capture_output=True, text=True,
    )  # fmt: skip
    imported = Path(answer.stdout.strip()) if answer.returncode == 0 else None
    if imported is None or not imported.is_relative_to(sandbox.tree):
        raise IsolationError(f"csi_wasm is imported from {imported or answer.stderr.strip()}, not from {sandbox.tree}")


# -- running ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    mutation: Mutation
    status: str  # KILLED, SURVIVED, ERROR
    seconds: float
    detail: str  # the first failing test, or why there is no verdict


def run_tests(sandbox: Sandbox, tests: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """pytest on ``tests`` in the copy, stopping at the first failure: (exit code or None on timeout, output)."""
    command = [str(sandbox.python), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "--rootdir", str(sandbox.tree), *tests]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=sandbox.tree, env=sandbox.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        return None, _text(exc.stdout) + _text(exc.stderr)
    return done.returncode, done.stdout + done.stderr


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def judge(mutation: Mutation, code: int | None, output: str, seconds: float) -> Verdict:
    if code == 0:
        return Verdict(mutation, "SURVIVED", seconds, "")
    if code == 1:  # pytest: some test failed
        return Verdict(mutation, "KILLED", seconds, first_failure(output) or "(a test failed)")
    why = "timed out" if code is None else f"pytest exit code {code}"
    return Verdict(mutation, "ERROR", seconds, f"{why}: {_last_line(output)}")


def first_failure(output: str) -> str | None:
    failed = _FIRST_FAILURE.search(output.rpartition(_SUMMARY)[2])
    return failed.group(1) if failed else None


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def run_mutation(mutation: Mutation, sandbox: Sandbox, timeout: float, logs: Path | None) -> Verdict:
    started = time.monotonic()
    fresh_copy(sandbox)
    apply(mutation, sandbox.tree)
    check_isolation(sandbox)
    code, output = run_tests(sandbox, mutation.tests, timeout)
    if logs is not None:
        (logs / f"{mutation.id}.log").write_text(output)
    return judge(mutation, code, output, time.monotonic() - started)


def baseline(sandbox: Sandbox, mutations: Iterable[Mutation], timeout: float) -> None:
    """The selected tests pass on the unmutated copy, or the pass stops (a kill would mean nothing)."""
    tests = sorted({test for mutation in mutations for test in mutation.tests})
    fresh_copy(sandbox)
    check_isolation(sandbox)
    started = time.monotonic()
    code, output = run_tests(sandbox, tests, timeout)
    if code != 0:
        raise SystemExit(
            f"baseline: the selected tests fail without any mutation ({first_failure(output) or _last_line(output)}); "
            "fix that first"
        )
    print(f"baseline  {time.monotonic() - started:7.1f}s  {len(tests)} test selections pass unmutated", flush=True)


def line(verdict: Verdict) -> str:
    mutation = verdict.mutation
    note = verdict.detail
    if verdict.status == "SURVIVED":
        note = f"harmless: {mutation.harmless}" if mutation.harmless else f"guard: {mutation.guard}"
    return f"{verdict.status:<9} {verdict.seconds:7.1f}s  {mutation.id:<40} {note}"


def summary(verdicts: Sequence[Verdict], seconds: float) -> tuple[str, bool]:
    """The closing lines, and whether the pass is clean (no unexpected survivor, no error)."""
    killed = [v for v in verdicts if v.status == "KILLED"]
    survived = [v for v in verdicts if v.status == "SURVIVED"]
    errors = [v for v in verdicts if v.status == "ERROR"]
    judged = [v for v in verdicts if v.status != "ERROR"]
    rate = f"{100.0 * len(killed) / len(judged):.0f}%" if judged else "-"
    lines = [f"mutations: {len(verdicts)}, killed: {len(killed)}, survived: {len(survived)}, errors: {len(errors)}, "
             f"kill rate: {rate}, total time: {seconds / 60:.1f} min"]  # fmt: skip
    for verdict in survived:
        judgement = f"harmless: {verdict.mutation.harmless}" if verdict.mutation.harmless else "NOT JUDGED HARMLESS"
        lines.append(f"  survivor {verdict.mutation.id} ({verdict.mutation.file}): {judgement}")
    unexpected = [v for v in survived if not v.mutation.harmless]
    return "\n".join(lines), not unexpected and not errors


def select(only: Sequence[str] | None) -> list[Mutation]:
    if not only:
        return list(MUTATIONS)
    by_id = {m.id: m for m in MUTATIONS}
    unknown = [name for name in only if name not in by_id]
    if unknown:
        raise SystemExit(f"unknown mutation id(s): {', '.join(unknown)} (see --list)")
    return [by_id[name] for name in only]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only (default: all)")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    parser.add_argument("--logs", type=Path, help="keep each mutation's pytest output in this directory")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT_SECONDS,
                        help="seconds per pytest run (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    mutations = select(args.only)
    if args.list:
        for mutation in mutations:
            print(f"{mutation.id:<40} {mutation.file:<34} {mutation.guard}")
        return 0
    for mutation in mutations:  # a catalogue that no longer applies fails before anything runs
        mutated_text(mutation, (ROOT / mutation.file).read_text())
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="csi-wasm-mutants-") as base:
        sandbox = make_sandbox(Path(base))
        if not args.no_baseline:
            baseline(sandbox, mutations, args.timeout)
        verdicts = []
        for mutation in mutations:
            verdict = run_mutation(mutation, sandbox, args.timeout, args.logs)
            print(line(verdict), flush=True)
            verdicts.append(verdict)
    text, clean = summary(verdicts, time.monotonic() - started)
    print(text, flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
