"""``make mutants``: mutation testing of methods/ (SOP and the shared distillation math), train/ (with optim/
and checkpoints/checkpoint.py), data/ and the eval metrics with mutmut 3.

    python tools/mutants.py [--jobs N] [--package methods train ...] [--keep] [--report-only]

Runs ``mutmut run`` (configured in ``[tool.mutmut]`` of pyproject.toml) on the mutants of the packages
below, then prints killed / timeout / survived / no-test counts and the kill rate per package and per file,
and writes every mutant that was not killed, with its file:line and diff, to ``mutants/survivors.txt``.

What this adds to mutmut 3:

* Functions whose only decorators are ``@torch.no_grad()`` / ``@torch.inference_mode()`` are mutated too
  (mutmut skips every decorated function; these two only switch autograd off around the call, so they are
  safe on the trampoline and on every mutant copy): prototype building, the memory enqueue, the k-NN vote,
  gradient clipping. Properties and registering decorators are still skipped.
* Each package's mutants are judged by that package's own tests (``TESTS_FOR``, a subset of ``make test``),
  fastest first, at most ``--budget`` seconds of them (``BUDGET_FOR``, as timed by mutmut's coverage run,
  always at least one): a mutant killed here is killed by ``make test``, and a mutant no unit test pins
  shows up instead of hiding behind the tiny end-to-end runs. This keeps the whole run well under an hour
  on 2 cores.
* The fork server's heap is frozen after it imported the suite, so pytest's closing ``gc.collect()`` in
  each mutant's run skips torch and the collected tests (0.3 s per mutant instead of 3 s).
* The summary is grouped by package and file, and the mutants listed in ``tools/equivalent_mutants.txt``
  (no observable behaviour change, each with its reason) are not counted.

Kill rate = (killed + timeout) / (total - equivalent): a mutant no selected test reaches counts as a
survivor. Error-message wording is not mutated (``do_not_mutate_patterns`` in pyproject.toml).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = ROOT / "tools" / "equivalent_mutants.txt"

# Mutant names are "<module>.<mangled function>__mutmut_<n>", the function mangled as x_<name> or
# xǁ<Class>ǁ<name>.
PACKAGES: dict[str, tuple[str, ...]] = {
    "methods": ("sopvit.methods.sop.*", "sopvit.methods.distill.*"),
    # the loop; its online k-NN (train/online_knn.py, eval/online.py before the move) was never in scope
    "train": (
        "sopvit.train.trainer.*",
        "sopvit.train.step.*",
        "sopvit.train.monitor.*",
        "sopvit.train.schedules.*",
        "sopvit.optim.*",
        "sopvit.checkpoints.checkpoint.*",
    ),
    "data": ("sopvit.data.*",),
    "eval-metrics": (
        "sopvit.eval.knn.x_knn_accuracy__mutmut_*",
        "sopvit.eval.knn.x_knn_accuracies__mutmut_*",
        "sopvit.eval.davis_metrics.*",
        "sopvit.eval.retrieval.x_average_precision__mutmut_*",
        "sopvit.eval.retrieval.x_compute_map__mutmut_*",
        "sopvit.eval.retrieval.x_protocol_gnd__mutmut_*",
        "sopvit.eval.copydays.x_block_id__mutmut_*",
        "sopvit.eval.copydays.x_strong_positives__mutmut_*",
        "sopvit.eval.copydays.x_copy_detection_map__mutmut_*",
    ),
}
# The tests that judge each package's mutants (node-id prefixes).
TESTS_FOR: dict[str, tuple[str, ...]] = {
    "methods": ("tests/methods/",),
    "train": ("tests/train/", "tests/optim/", "tests/checkpoints/"),
    "data": ("tests/data/",),
    "eval-metrics": ("tests/eval/",),
}
# Seconds of tests per mutant (fastest first). train/ gets more: its behaviour tests each build a tiny
# Trainer, and the end-to-end resume tests that pin the checkpoint contents take 0.2-0.6 s each.
BUDGET_FOR: dict[str, float] = {"methods": 5.0, "train": 20.0, "data": 5.0, "eval-metrics": 5.0}
# A second pass, after the run: surviving mutants of the listed functions meet more of ``make test``.
# * The 2-rank tests run their ranks in subprocesses, which mutmut's in-process map of tests to functions
#   never sees: a mutant only they can kill (DDP wrapping and its no_sync, the world factor of the global
#   batch) would stay a survivor. The mutant is switched on in every rank through MUTANT_UNDER_TEST.
# * train/'s behaviour tests each build a tiny run (1-3 s), so the time budget, which takes the fastest
#   tests first, leaves them out for functions that a hundred quick tests also reach (Trainer.fit, the step).
RECHECKS: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {
    # SOP's config checks are also pinned by the pre-training options' tests, which tiny-train
    "methods": [
        (("sopvit.methods.*",), ("tests/methods/",)),
        (("sopvit.methods.sop.config.*",), ("tests/train/test_pretrain_options.py",)),
    ],
    "train": [
        (("sopvit.optim.*",), ("tests/optim/",)),
        (("sopvit.checkpoints.checkpoint.*",), ("tests/checkpoints/", "tests/faults/test_disk.py")),
        (
            ("sopvit.train.*", "sopvit.optim.*", "sopvit.checkpoints.checkpoint.*"),
            (
                "tests/train/test_step_accumulation.py",
                "tests/train/test_trainer_behaviour.py",
                "tests/train/test_step_behaviour.py",
                "tests/train/test_monitor_behaviour.py",
                "tests/checkpoints/test_checkpoint_behaviour.py",
            ),
        ),
        (
            ("sopvit.train.trainer.xǁTrainerǁ__init____mutmut_*", "sopvit.train.step.x_train_step__mutmut_*"),
            ("tests/train/test_distributed_train.py::test_two_ranks_match_one_process",),
        ),
    ],
    # the input pipeline's behaviour tests each build a tiny run, as train/'s do
    "data": [
        (
            ("sopvit.data.pipeline.*", "sopvit.data.prefetch.*"),
            ("tests/data/test_pipeline_behaviour.py", "tests/data/test_prefetch_behaviour.py"),
        ),
        (("sopvit.data.config.*",), ("tests/data/test_config.py",)),
        # the workers path's collation is exercised end to end by the step's tests
        (("sopvit.data.pipeline.x__collate*",), ("tests/train/test_step_behaviour.py",)),
        # the statistical and exact-parameter tests are slower than the 5 s budget takes first
        (("sopvit.data.crop_params.*", "sopvit.data.masking.*", "sopvit.data.pipeline.*"), ("tests/data/",)),
    ],
}
TRANSPARENT_DECORATORS = frozenset({"torch.no_grad()", "torch.inference_mode()"})
DETECTED = ("killed", "timeout", "segfault", "caught by type check")


def allow_transparent_decorators() -> None:
    """Let mutmut mutate functions whose only decorators are ``TRANSPARENT_DECORATORS``."""
    import libcst as cst
    from libcst.metadata import PositionProvider
    from mutmut.mutation import file_mutation

    visitor = file_mutation.MutationVisitor
    original = visitor._skip_node_and_children
    if getattr(original, "_sopvit_patched", False):
        return

    def skip(self: file_mutation.MutationVisitor, node: cst.CSTNode) -> bool:
        if isinstance(node, cst.FunctionDef) and node.decorators:
            codes = {cst.Module([]).code_for_node(d.decorator) for d in node.decorators}
            if codes <= TRANSPARENT_DECORATORS:
                position = self.get_metadata(PositionProvider, node, None)
                if position and position.start.line in self._ignored_node_lines:
                    self.ignored_functions.add(node.name.value)
                    return True
                return node.name.value in file_mutation.NEVER_MUTATE_FUNCTION_NAMES
        return bool(original(self, node))

    skip._sopvit_patched = True  # type: ignore[attr-defined]
    visitor._skip_node_and_children = skip  # type: ignore[method-assign]


def select_tests(budget: float | None) -> None:
    """Keep, for each mutated function, its package's tests (``TESTS_FOR``) that ran it, at most ``budget``
    seconds of them (default: ``BUDGET_FOR`` its package; fastest first, at least one), and hand them to
    pytest fastest first: pytest stops at the first failure, so a killed mutant usually costs one quick
    unit test."""
    from mutmut import __main__ as mutmut_main
    from mutmut.state import state
    from mutmut.workers import isolation

    collect = mutmut_main.collect_or_load_stats
    if getattr(collect, "_sopvit_patched", False):
        return

    def collect_then_select(*args: Any, **kwargs: Any) -> None:
        collect(*args, **kwargs)
        durations = state().duration_by_test
        for function, tests in state().tests_by_mangled_function_name.items():
            package = package_of(f"{function}__mutmut_1", PACKAGES)
            prefixes = TESTS_FOR.get(package or "", ())
            limit = budget if budget is not None else BUDGET_FOR.get(package or "", 5.0)
            chosen: set[str] = set()
            spent = 0.0
            for test in sorted(
                (t for t in tests if t.startswith(prefixes)), key=lambda t: (durations.get(t, 0.0), t)
            ):
                if chosen and spent + durations.get(test, 0.0) > limit:
                    break
                chosen.add(test)
                spent += durations.get(test, 0.0)
            tests.intersection_update(chosen)

    collect_then_select._sopvit_patched = True  # type: ignore[attr-defined]
    mutmut_main.collect_or_load_stats = collect_then_select  # type: ignore[assignment]

    for runner in (isolation.ForkServerRunner, isolation.ForkRunner):

        def fast_first(
            self: isolation.MutantRunner,
            mutant_name: str,
            tests: list[str],
            cpu_time_limit: int,
            estimated_time: float,
            _submit: Callable[..., None] = runner.submit,
        ) -> None:
            durations = state().duration_by_test
            ordered = sorted(tests, key=lambda t: (durations.get(t, 0.0), t))
            _submit(self, mutant_name, ordered, cpu_time_limit, estimated_time)

        runner.submit = fast_first  # type: ignore[method-assign]


def freeze_warm_heap() -> None:
    """Freeze the fork server's heap after it imported the tests: otherwise every mutant's pytest run ends
    with gc.collect() passes over torch and the whole collected suite (seconds per mutant, not 0.3 s)."""
    import gc

    from mutmut.runners.harness import PytestRunner

    warm_up = PytestRunner.warm_up
    if getattr(warm_up, "_sopvit_patched", False):
        return

    def warm_then_freeze(self: PytestRunner) -> None:
        warm_up(self)
        gc.freeze()

    warm_then_freeze._sopvit_patched = True  # type: ignore[attr-defined]
    PytestRunner.warm_up = warm_then_freeze  # type: ignore[method-assign]


def quiet_mutant_list() -> None:
    """Drop mutmut's closing list of every named mutant (thousands of lines): mutants/survivors.txt has the
    ones that matter. mutmut resets sys.stdout itself, so its module's ``print`` is filtered instead."""
    import builtins

    from mutmut import __main__ as mutmut_main

    listing = False

    def print_until_the_list(*args: Any, **kwargs: Any) -> None:
        nonlocal listing
        listing = listing or any("Mutant results" in str(a) for a in args)
        if not listing:
            builtins.print(*args, **kwargs)

    mutmut_main.print = print_until_the_list  # type: ignore[attr-defined]


def package_of(name: str, packages: dict[str, tuple[str, ...]]) -> str | None:
    for package, patterns in packages.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return package
    return None


def load_equivalent() -> dict[str, str]:
    """``tools/equivalent_mutants.txt``: ``<mutant name> <reason>`` per line, ``#`` comments."""
    out: dict[str, str] = {}
    if not EQUIVALENT_FILE.is_file():
        return out
    for line in EQUIVALENT_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


def load_results() -> dict[str, tuple[Path, str]]:
    """Mutant name -> (source file, status) from mutmut's ``mutants/**/*.py.meta`` files."""
    from mutmut.stats import status_by_exit_code

    results: dict[str, tuple[Path, str]] = {}
    for meta in sorted((ROOT / "mutants" / "src").rglob("*.py.meta")):
        source = meta.relative_to(ROOT / "mutants").with_suffix("")
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            results[name] = (source, status_by_exit_code[code])
    return results


@dataclass
class Survivor:
    name: str
    status: str
    where: str
    diff: list[str]


def describe(name: str, source: Path) -> Survivor:
    """file:line of the first changed line and the changed lines of the mutant."""
    import libcst as cst
    from mutmut.mutation.diff_apply import read_functions_from_index
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    functions = read_functions_from_index(name, source)
    if functions is None:
        return Survivor(name, "", str(source), [])
    orig, mutant = (cst.Module([f]).code.splitlines() for f in functions)
    diff = [
        line
        for line in difflib.unified_diff(orig, mutant, lineterm="", n=0)
        if line[:1] in "-+" and not line.startswith(("---", "+++"))
    ]
    changed = next(
        (
            i1
            for tag, i1, _, _, _ in difflib.SequenceMatcher(None, orig, mutant).get_opcodes()
            if tag != "equal"
        ),
        0,
    )
    def_index = next(
        (i for i, line in enumerate(orig) if line.lstrip().startswith(("def ", "async def "))), 0
    )
    function, cls = orig_function_and_class_names_from_key(name)
    line = 0
    tree = ast.parse((ROOT / source).read_text(encoding="utf-8"))
    scopes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls] if cls else [tree]
    for scope in scopes:
        for node in scope.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
                line = node.lineno + changed - def_index
    return Survivor(name, "", f"{source}:{line}", diff)


def report(packages: dict[str, tuple[str, ...]], elapsed: float | None) -> int:
    equivalent = load_equivalent()
    results = load_results()
    by_package: dict[str, Counter[str]] = {p: Counter() for p in packages}
    by_file: dict[Path, Counter[str]] = {}
    survivors: list[Survivor] = []
    stale: list[str] = []
    for name, (source, status) in sorted(results.items()):
        package = package_of(name, packages)
        if package is None:
            continue
        if name in equivalent:
            if status in ("survived", "no tests"):  # "no tests": the rechecks' tests reached it, in vain
                status = "equivalent"
            else:
                stale.append(f"{name} ({status})")
        by_package[package][status] += 1
        by_file.setdefault(source, Counter())[status] += 1
        if status not in (*DETECTED, "equivalent", "not checked"):
            survivor = describe(name, source)
            survivor.status = status
            survivors.append(survivor)
    stale += [f"{name} (no such mutant)" for name in equivalent if name not in results]

    def row(label: str, c: Counter[str]) -> str:
        total = sum(c.values())
        killed = c["killed"] + c["segfault"] + c["caught by type check"]
        alive = total - killed - c["timeout"] - c["equivalent"] - c["not checked"]
        counted = total - c["equivalent"] - c["not checked"]
        rate = f"{100.0 * (killed + c['timeout']) / counted:6.1f}%" if counted else "     -"
        return (
            f"{label:<38} {killed:>6} {c['timeout']:>7} {alive:>8} {c['no tests']:>9} {c['equivalent']:>10} "
            f"{c['not checked']:>7} {total:>6} {rate:>9}"
        )

    header = (
        f"{'':<38} {'killed':>6} {'timeout':>7} {'survived':>8} {'(no test)':>9} {'equivalent':>10} "
        f"{'not run':>7} {'total':>6} {'kill rate':>9}"
    )
    print()
    print(header)
    for source, c in sorted(by_file.items()):
        print(row(str(source), c))
    print("-" * len(header))
    for package, c in by_package.items():
        print(row(package, c))
    print(row("all", sum(by_package.values(), Counter())))
    print(
        "\nkill rate = (killed + timeout) / (total - equivalent - not run); survived includes the mutants no "
        "test reaches (no test); not run: left by an interrupted run"
    )
    if elapsed is not None:
        print(f"mutmut ran {elapsed / 60:.1f} minutes")
    out = ROOT / "mutants" / "survivors.txt"
    with out.open("w", encoding="utf-8") as f:
        for s in sorted(survivors, key=lambda s: (s.where.split(":")[0], int(s.where.split(":")[-1] or 0))):
            f.write(f"{s.where}  {s.name}  [{s.status}]\n")
            f.writelines(f"    {line}\n" for line in s.diff)
    print(f"{len(survivors)} mutants not killed (not listed as equivalent): {out.relative_to(ROOT)}")
    if stale:
        print(f"{len(stale)} entries of {EQUIVALENT_FILE.relative_to(ROOT)} are not surviving mutants now:")
        for entry in stale:
            print(f"    {entry}")
    return 0


def recheck_pass(packages: dict[str, tuple[str, ...]], jobs: int) -> None:
    """Run ``RECHECKS``' tests on the surviving mutants of their functions; record the killed."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    equivalent = load_equivalent()
    for package, checks in RECHECKS.items():
        if package not in packages:
            continue
        for functions, tests in checks:
            results = load_results()
            names = [
                name
                for name, (_, status) in results.items()
                if status in ("survived", "no tests")  # no test of the package's own reached it
                and name not in equivalent
                and package_of(name, packages) == package
                and any(fnmatch.fnmatchcase(name, f) for f in functions)
            ]

            def run(name: str, tests: tuple[str, ...] = tests) -> tuple[str, int, str]:
                env = {**os.environ, "MUTANT_UNDER_TEST": name, "PYTHONPATH": "src"}
                cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
                done = subprocess.run(cmd, cwd=ROOT / "mutants", env=env, capture_output=True, text=True)
                return name, done.returncode, done.stdout[-2000:]

            with ThreadPoolExecutor(jobs) as pool:
                outcomes = list(pool.map(run, names))
            for name, code, out in outcomes:
                if code == 0:
                    continue
                if code != 1:  # 1: a test failed; anything else is a broken run, not a kill
                    raise RuntimeError(f"{name}: the recheck tests could not run:\n{out}")
                meta = ROOT / "mutants" / f"{results[name][0]}.meta"
                data = json.loads(meta.read_text())
                data["exit_code_by_key"][name] = 1
                meta.write_text(json.dumps(data, indent=4))
                print(f"killed on recheck ({', '.join(tests)}): {name}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested in parallel")
    parser.add_argument("--package", nargs="+", choices=sorted(PACKAGES), help="only these packages")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of tests per mutant at most (default: 20 for train, 5 for the others)",
    )
    parser.add_argument("--keep", action="store_true", help="reuse mutants/ (default: generate afresh)")
    parser.add_argument("--report-only", action="store_true", help="summarise the last run, run nothing")
    parser.add_argument(
        "--recheck-only", action="store_true", help="only the second pass (RECHECKS) over the last run"
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    packages = {p: PACKAGES[p] for p in args.package} if args.package else PACKAGES
    if args.report_only:
        return report(packages, None)
    if args.recheck_only:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        recheck_pass(packages, args.jobs)
        return report(packages, None)
    if not args.keep:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    # One thread per test process: --jobs processes share the cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    allow_transparent_decorators()
    select_tests(args.budget)
    freeze_warm_heap()
    from mutmut.__main__ import cli

    patterns = [p for group in packages.values() for p in group]
    start = time.monotonic()
    quiet_mutant_list()
    try:
        cli.main(["run", "--max-children", str(args.jobs), *patterns], standalone_mode=False)
    except SystemExit as err:
        if err.code:
            return int(err.code) if isinstance(err.code, int) else 1
    recheck_pass(packages, args.jobs)
    return report(packages, time.monotonic() - start)


if __name__ == "__main__":
    sys.exit(main())
