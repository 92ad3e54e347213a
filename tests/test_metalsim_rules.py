"""The simulated Metal's own rules, each broken on purpose from Objective-C.

metalsim/tests/rules.m holds one case per rule the simulator models (the
validation rules, Metal's documented behaviour it reproduces, its fault
knobs), each breaking the rule on purpose and keeping it in a twin, so a
rule that never fires or always fires fails. The cases talk to the
simulator directly, not through mlxbuf; this file builds them into one
program with the simulator's own flags (metalsim/build.py) and runs each
case in a process of its own.

They need clang-19 and ObjFW on Linux, not a simulator build of mlxbuf, so
they run in the plain suite too. Without the toolchain they skip with the
reason; in CI on Linux (the CI environment variable set) that is a
failure instead.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIM = ROOT / "metalsim"
RULES_SOURCE = SIM / "tests" / "rules.m"
CASES = re.findall(r"^CASE\((\w+)\)", RULES_SOURCE.read_text(), re.M)
# The watchdogs wait their full 10 s before they speak.
SLOW = {"queue_watchdog_at_64_uncompleted", "event_wait_watchdog"}


def _metalsim_build():
    spec = importlib.util.spec_from_file_location("metalsim_build", SIM / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def rules_program():
    if not sys.platform.startswith("linux"):
        pytest.skip("the simulated Metal is built on Linux; on a Mac the real Metal runs")
    build = _metalsim_build()
    problem = build.toolchain_problem()
    if problem:
        reason = f"the simulator's rule tests need clang-19 and ObjFW: {problem}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}. CI must run them, so this is a failure, not a skip.", pytrace=False)
        pytest.skip(reason)
    return build.build_executable([RULES_SOURCE], ROOT / ".metalsim-build" / "rules", ["-O1"])


def test_the_driver_lists_every_case(rules_program):
    listed = subprocess.run([rules_program, "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == CASES


def test_every_validation_rule_is_broken_by_some_case():
    """Each rule the simulator can report appears in an EXPECT_RULE of rules.m."""
    reported = set()
    for source in SIM.glob("*.m"):
        reported |= set(re.findall(r'msim__invalid\(\s*"([a-z0-9-]+)"', source.read_text()))
    expected = set(re.findall(r'EXPECT_RULE\("([a-z0-9-]+)"\)', RULES_SOURCE.read_text()))
    assert reported, "no validation rules found in metalsim/*.m"
    assert reported - expected == set(), "rules no case breaks"
    assert expected - reported == set(), "cases expect rules the simulator does not have"


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_rule(rules_program, case):
    result = subprocess.run([rules_program, case], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(f"{case}: ok")
