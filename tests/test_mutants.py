"""The mutation pass's catalogue still fits the code, and its runner judges and isolates runs correctly.

Fast: nothing here runs a mutant's tests (that is ``python -m tools.mutants``). When a
refactor moves a guarded line, ``test_every_mutation_applies_to_the_current_tree``
fails and names the entry of ``tools/mutations.py`` to update.
"""

from __future__ import annotations

import ast
import pathlib
import re
import shutil
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # scripts, not a package (as tests/test_faults.py imports soak)

from mutants import CatalogueError, IsolationError, check_isolation, judge, make_sandbox, mutated_text  # noqa: E402
from mutations import MUTATIONS, Mutation  # noqa: E402

# The modules issue 14 and docs/reliability.md name as guarded: each has at least one mutation.
GUARDED_MODULES = {
    "csi_wasm/access.py", "csi_wasm/admission.py", "csi_wasm/config.py", "csi_wasm/endpoint.py", "csi_wasm/http.py",
    "csi_wasm/integrity.py", "csi_wasm/mounts.py", "csi_wasm/publish.py", "csi_wasm/pull.py", "csi_wasm/recovery.py",
    "csi_wasm/servicers.py", "csi_wasm/statedir.py", "csi_wasm/store.py", "csi_wasm/targets.py",
    "csi_wasm/tarstream.py", "csi_wasm/topology.py", "csi_wasm/registry/bodies.py", "csi_wasm/registry/client.py",
    "csi_wasm/registry/ssrf.py", "csi_wasm/registry/transport.py", "csi_wasm/registry/watchdog.py",
}  # fmt: skip
ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_every_mutation_applies_to_the_current_tree(mutation: Mutation) -> None:
    source = (ROOT / mutation.file).read_text()
    mutated = mutated_text(mutation, source)  # CatalogueError unless the old text is there exactly once
    assert mutated != source
    ast.parse(mutated)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_every_mutation_is_well_formed(mutation: Mutation) -> None:
    assert ID.match(mutation.id), mutation.id
    assert mutation.file.startswith("csi_wasm/") and mutation.file.endswith(".py"), mutation.file
    assert mutation.old and mutation.old != mutation.new
    assert mutation.guard.strip() and "\n" not in mutation.guard
    assert mutation.harmless is None or (mutation.harmless.strip() and "\n" not in mutation.harmless)
    assert mutation.tests
    for test in mutation.tests:
        file, _, node = test.partition("::")
        assert file.startswith("tests/test_") and (ROOT / file).is_file(), test
        if node:
            function = node.split("[", 1)[0]
            assert re.search(rf"^def {function}\(", (ROOT / file).read_text(), re.MULTILINE), test


def test_ids_are_unique_and_every_guarded_module_is_covered() -> None:
    ids = [m.id for m in MUTATIONS]
    assert len(ids) == len(set(ids))
    assert GUARDED_MODULES <= {m.file for m in MUTATIONS}


def test_a_mutation_whose_text_moved_or_repeats_is_refused() -> None:
    gone = Mutation("gone", "csi_wasm/store.py", "no such line", "x", "guard", ("tests/test_mutants.py",))
    with pytest.raises(CatalogueError, match="occurs 0 times"):
        mutated_text(gone, "a = 1\n")
    twice = Mutation("twice", "csi_wasm/store.py", "a = 1\n", "a = 2\n", "guard", ("tests/test_mutants.py",))
    with pytest.raises(CatalogueError, match="occurs 2 times"):
        mutated_text(twice, "a = 1\na = 1\n")
    broken = Mutation("broken", "csi_wasm/store.py", "a = 1", "a = (", "guard", ("tests/test_mutants.py",))
    with pytest.raises(CatalogueError, match="not valid Python"):
        mutated_text(broken, "a = 1\n")


def test_verdicts_follow_pytests_exit_code() -> None:
    mutation = MUTATIONS[0]
    output = ("ERROR    csi_wasm.recovery:logs.py:32 repair.tampered_mount\n"  # a captured log line, not a test
              "=========== short test summary info ===========\n"
              "FAILED tests/test_x.py::test_y[a b] - AssertionError\n1 failed, 3 passed\n")  # fmt: skip
    killed = judge(mutation, 1, output, 1.0)
    assert (killed.status, killed.detail) == ("KILLED", "tests/test_x.py::test_y[a b]")
    assert judge(mutation, 0, "4 passed", 1.0).status == "SURVIVED"
    for code in (2, 4, 5, None):  # interrupted, usage error, nothing collected, timed out: no verdict
        assert judge(mutation, code, "no tests ran", 1.0).status == "ERROR"


def test_the_sandbox_imports_the_copy_and_nothing_else(tmp_path: pathlib.Path) -> None:
    sandbox = make_sandbox(tmp_path)
    sandbox.tree.mkdir()
    with pytest.raises(IsolationError):  # no copy yet: the checkout's editable install must not stand in
        check_isolation(sandbox)
    shutil.copytree(ROOT / "csi_wasm", sandbox.tree / "csi_wasm", ignore=shutil.ignore_patterns("__pycache__"))
    check_isolation(sandbox)
