"""Tests of the sandbox for model-generated code (data/sandbox.py; rewards of paper sections 2 and 4).

Each adversarial program below would "pass" a naive harness that trusts the exit status or
the output; here it must fail, and fail without harming this machine. The reference solutions
of both code tasks must pass, so the sandbox is not simply failing everything.
"""
import os
import re
import time

import pytest

from data import SPLITS, TASKS, load
from data.sandbox import run_many, run_tests, throwaway_uid

GOOD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\ndone = True\n"


def test_a_correct_program_passes_and_a_wrong_one_fails():
    good, wrong = run_tests(GOOD, TESTS), run_tests(WRONG, TESTS)
    assert good.passed and good.status == "passed"
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.stderr


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_reference_solutions_pass(task):
    code = TASKS[task]
    problems = [p for split in SPLITS[task] for p in load(task, split)]
    jobs = [(code.program(p, code.reference_response(p)), p["tests"]) for p in problems]
    # a generous timeout: mbpp/123's reference needs ~7 s of CPU, more on a busy machine
    results = run_many(jobs, workers=4, timeout=60)
    failed = [(p["id"], r.status, r.stderr[-200:]) for p, r in zip(problems, results) if not r.passed]
    assert not failed
    assert len(results) == {"humaneval": 164, "mbpp": 500}[task]


def test_score_many_runs_in_order():
    mbpp = TASKS["mbpp"]
    problems = load("mbpp", "validation")[:6]
    responses = [mbpp.reference_response(p) if i % 2 == 0 else "```python\ndef nothing(): pass\n```"
                 for i, p in enumerate(problems)]
    assert mbpp.score_many(problems, responses, workers=3) == [True, False] * 3


def test_code_extraction_is_forgiving():
    humaneval = TASKS["humaneval"]
    p = load("humaneval", "test")[0]
    body = p["solution"][len(p["prompt"]):]
    assert humaneval.score(p, f"Here you go:\n```python\n{p['solution']}```\nHope this helps.")
    assert humaneval.score(p, f"```python\n{body}")           # body only, fence cut off by the token limit
    assert humaneval.score(p, p["solution"])                   # bare code, no fence
    assert not humaneval.score(p, "```python\n    return True\n```")


# ----------------------------------------------------------------------------- adversarial programs

CHEATS = {
    "sys.exit(0) before the tests": "import sys\nsys.exit(0)\n",
    "os._exit(0) before the tests": "import os\nos._exit(0)\n",
    "SystemExit from an excepthook": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
    "exit(0) at interpreter shutdown": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "redefine AssertionError": "AssertionError = type('AssertionError', (Exception,), {})\n",
    "patch builtins.AssertionError": "import builtins\nbuiltins.AssertionError = KeyboardInterrupt\n",
    "empty __builtins__": "__builtins__ = {}\n",
    "clear the builtins module": "import builtins\nbuiltins.__dict__.clear()\n",
    "make exec a no-op": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n",
    "trace function that jumps over asserts": (
        "import sys\n"
        "def skip(frame, event, arg):\n"
        "    if event == 'line' and frame.f_code.co_filename == '<tests>':\n"
        "        last = max(line for _, _, line in frame.f_code.co_lines() if line)\n"
        "        if frame.f_lineno < last:\n"
        "            frame.f_lineno = last\n"
        "    return skip\n"
        "sys.settrace(skip)\n"),
    "print a fake success marker": "print('passed'); print('All tests passed!'); print('OK')\n",
    "write junk to every pipe": (
        "import os, sys\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        "        os.write(fd, b'0123456789abcdef0123456789abcdef')\n"
        "    except OSError:\n"
        "        pass\n"
        "sys.exit(0)\n"),
    "read the job pipe for the nonce": (
        "import os, sys\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        "        os.set_blocking(fd, False)\n"
        "        print(fd, os.read(fd, 100000), file=sys.stderr)\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"),
    "syntax error": "def add(a, b)\n    return a + b\n",
    "read stdin": "x = input()\n",
    "memory bomb": "x = bytearray(64 << 30)\n",
    "growing memory": "x = []\nwhile True:\n    x.append(' ' * (1 << 20))\n",
    "fork loop": "import os\nwhile True:\n    os.fork()\n",
    "subprocess": "import subprocess\nsubprocess.run(['sleep', '30'])\n",
    "huge file": "with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n",
}


@pytest.mark.parametrize("name", CHEATS)
def test_cheating_programs_fail(name):
    # the cheat comes first, then a wrong solution: only a sandbox that is fooled would pass it
    result = run_tests(CHEATS[name] + WRONG, TESTS, timeout=5)
    assert not result.passed, (name, result)
    assert result.status != "passed"


def test_cheats_do_not_break_a_correct_solution_either():
    # a correct solution wrapped in a cheat that exits early still fails: the tests never ran
    assert not run_tests(GOOD + "import os\nos._exit(0)\n", TESTS).passed


@pytest.mark.parametrize("call", ["os.fork()", "os.system('true')", "subprocess.run(['true'])",
                                  "os.kill(os.getppid(), 0)"])  # signal 0: harmless even if it got through
def test_new_processes_and_signals_are_refused(call):
    result = run_tests(f"import os, subprocess\n{call}\n" + GOOD, TESTS)
    assert not result.passed and "PermissionError" in result.stderr


def test_infinite_loop_is_stopped_by_the_timeout():
    began = time.monotonic()
    result = run_tests("while True:\n    pass\n", TESTS, timeout=2)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - began < 10


def test_sleeping_program_is_stopped_by_the_timeout():
    result = run_tests("import time\ntime.sleep(60)\n" + GOOD, TESTS, timeout=1)
    assert result.status == "timeout"


def test_a_forked_child_dies_with_the_run():
    # ctypes gets past the guard on os.fork: the process group kill must still end the child
    program = (
        "import ctypes, os, time\n"
        "pid = ctypes.CDLL(None).fork()\n"
        "if pid == 0:\n"
        "    os.write(2, b'CHILD %d\\n' % os.getpid())\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n" + GOOD)
    result = run_tests(program, TESTS, timeout=10)
    child = int(re.search(r"CHILD (\d+)", result.stderr).group(1))
    time.sleep(0.2)
    assert not process_alive(child)


def process_alive(pid: int) -> bool:
    """True if pid runs (a zombie, killed but not yet reaped by init, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_environment_is_minimal_and_stdin_is_empty(monkeypatch):
    monkeypatch.setenv("SECRET_API_TOKEN", "hunter2")
    program = ("import os, sys\n"
               "assert 'SECRET_API_TOKEN' not in os.environ, os.environ\n"
               "assert 'hunter2' not in repr(os.environ)\n"
               "assert sys.stdin.read() == ''\n" + GOOD)
    assert run_tests(program, TESTS).passed


def test_working_folder_is_fresh_and_removed():
    program = ("import os, sys\n"
               "assert os.listdir('.') == []\n"
               "open('scratch.txt', 'w').write('x')\n"
               "sys.stderr.write('CWD ' + os.getcwd() + '\\n')\n" + GOOD)
    result = run_tests(program, TESTS)
    assert result.passed
    folder = re.search(r"CWD (\S+)", result.stderr).group(1)
    assert not os.path.exists(folder)


def test_writing_outside_the_folder_cannot_change_the_verdict(tmp_path):
    # Process-level sandbox: run as root without a throwaway uid, the write itself succeeds
    # (see the docstring of data/sandbox.py); it still cannot turn failed tests into a pass.
    outside = tmp_path / "outside.txt"
    program = f"open({str(outside)!r}, 'w').write('written')\n" + WRONG
    result = run_tests(program, TESTS)
    assert not result.passed
    if throwaway_uid() is not None:  # another user id cannot write into pytest's private tmp folder
        assert not outside.exists()


def test_run_many_keeps_the_order_of_the_jobs():
    jobs = [(GOOD, TESTS), (WRONG, TESTS), ("import sys\nsys.exit(0)\n", TESTS), (GOOD, TESTS)]
    assert [r.passed for r in run_many(jobs, workers=4)] == [True, False, False, True]
