"""Tests of the sandbox for model-generated code (data/sandbox.py; rewards of paper sections 2 and 4).

Each adversarial program below would "pass" a naive harness that trusts the exit status or
the output; here it must fail, and fail without harming this machine. The attacks on the host
run twice, as root and as an unprivileged user, each from a runner process of that user, and the
host is checked afterwards: no new file, no surviving process, nothing received on a socket, no
signal. The reference solutions of both code tasks must pass, so the sandbox is not simply
failing everything.
"""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import SPLITS, TASKS, load, sandbox
from data.sandbox import MAX_PROCESSES, NAMESPACES, PROCESS_ONLY, isolation, run_many, run_tests

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534  # the unprivileged user the attacks run as when we are root

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


def test_cheats_do_not_break_a_correct_solution_either():
    # a correct solution wrapped in a cheat that exits early still fails: the tests never ran
    assert not run_tests(GOOD + "import os\nos._exit(0)\n", TESTS).passed


# ----------------------------------------------------------------------------- attacks on the host

# Each attack asserts that it worked, then defines a correct solution: it passes only where the
# attack got through. {placeholders} are filled in by the fixture, PARENT_PID and VICTIM_PID by
# the runner (the process that calls run_tests, and a process of its user with a secret in its
# environment). Where a program cannot see its own success (UNSEEN: its private /tmp is writable,
# a child outlives the run only after it ended) a wrong solution follows, and the host check counts.
ATTACKS = {
    "write into the project folder": "open({project!r} + '/PWNED-{token}', 'w').write('x')\n",
    "write into /tmp": "open('/tmp/PWNED-{token}', 'w').write('x')\n",
    "write into the home folder": "open({home!r} + '/PWNED-{token}', 'w').write('x')\n",
    "connect to a listening socket on 127.0.0.1": (
        "import socket\n"
        "with socket.create_connection(('127.0.0.1', {port}), timeout=3) as s:\n"
        "    s.sendall(b'{token}')\n"),
    "read another process's environment through /proc": (
        "import os, sys\n"
        "def secret(pid):\n"
        "    try:\n"
        "        return b'{secret}' in open(f'/proc/{{pid}}/environ', 'rb').read()\n"
        "    except OSError:\n"
        "        return False\n"
        "found = [p for p in os.listdir('/proc') + ['VICTIM_PID'] if p.isdigit() and secret(p)]\n"
        "assert found\n"
        "print('LEAKED', found, file=sys.stderr)\n"),
    "kill the parent by pid with ctypes": (
        "import ctypes, os, signal\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.kill(os.getppid(), signal.SIGUSR1)\n"
        "assert libc.kill(PARENT_PID, signal.SIGUSR1) == 0\n"),
    "fork with ctypes, leave the session, outlive the run": (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None)\n"
        "if libc.fork() == 0:\n"
        "    libc.setsid()\n"
        "    libc.prctl(15, b'{comm}', 0, 0, 0)  # PR_SET_NAME: for the host to find it\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"),
    "fork bomb with ctypes": (
        "import ctypes, os, sys, time\n"
        "libc = ctypes.CDLL(None)\n"
        "forked = 0\n"
        "for i in range(200):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    forked += pid > 0\n"
        "print('FORKED', forked, file=sys.stderr)\n"
        "assert forked == 200\n"),
    "fill the disk from the working folder": (
        "for i in range(10):  # 150 MB: more than both writable tmpfs together\n"
        "    with open(f'big{{i}}', 'wb') as f:\n"
        "        f.write(b'x' * (15 << 20))\n"),
}
OUTLIVES = "fork with ctypes, leave the session, outlive the run"
UNSEEN = {"write into /tmp", OUTLIVES}

# Runs in a fresh interpreter as the user under test: the sandbox's source comes on stdin with
# the programs, so that this user needs to read nothing of the project.
RUNNER = r'''
import json, os, shutil, signal, subprocess, sys, types
job = json.load(sys.stdin)
sandbox = types.ModuleType("sandbox")
sys.modules["sandbox"] = sandbox
exec(compile(job["source"], "data/sandbox.py", "exec"), sandbox.__dict__)
received = []
signal.signal(signal.SIGUSR1, lambda *args: received.append(1))
victim = subprocess.Popen([shutil.which("sleep"), "60"], env={"SANDBOX_TEST": job["secret"]})
results = {}
for name, program in job["programs"].items():
    received.clear()
    program = program.replace("PARENT_PID", str(os.getpid())).replace("VICTIM_PID", str(victim.pid))
    r = sandbox.run_tests(program, job["tests"], timeout=5)
    results[name] = {"passed": r.passed, "status": r.status, "stderr": r.stderr[-300:], "signals": len(received)}
victim.kill()
print(json.dumps({"mode": sandbox.isolation(), "uid": os.geteuid(), "results": results}))
'''


def runner_for(kind: str) -> tuple[str, dict]:
    """The interpreter and Popen arguments of a runner of this kind ("root" or "unprivileged")."""
    if kind == "root":
        if os.geteuid() != 0:
            pytest.skip("not running as root")
        return sys.executable, {}
    if os.geteuid() != 0:
        return sys.executable, {}  # we are unprivileged already
    nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    # our interpreter may live where other users cannot read (pyenv under /root): then a system one
    for python in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        try:
            probe = subprocess.run([python, "-I", "-c", "import sys; assert sys.version_info >= (3, 10)"],
                                   capture_output=True, timeout=60, **nobody)
        except (OSError, TypeError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return python, nobody
    pytest.skip(f"no Python 3.10+ interpreter that user {NOBODY} may run")


def processes_named(comm: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                found.append(int(pid))
        except OSError:
            pass  # ended while we looked
    return found


@pytest.fixture(scope="module", params=["root", "unprivileged"])
def attacked(request) -> dict:
    """Every attack and every cheat, run once by a runner of this kind, and what the host saw."""
    python, user = runner_for(request.param)
    token = secrets.token_hex(6)
    comm = f"sbx{token}"  # at most 15 characters: the kernel's limit for a process name
    files = {"write into the project folder": ROOT / f"PWNED-{token}",
             "write into /tmp": Path("/tmp") / f"PWNED-{token}",
             "write into the home folder": Path.home() / f"PWNED-{token}"}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        values = {"project": str(ROOT), "home": str(Path.home()), "token": token, "comm": comm,
                  "port": listener.getsockname()[1], "secret": secrets.token_hex(8)}
        programs = {name: ATTACKS[name].format(**values) + (WRONG if name in UNSEEN else GOOD) for name in ATTACKS}
        programs.update({name: CHEATS[name] + WRONG for name in CHEATS})
        job = {"source": Path(sandbox.__file__).read_text(), "programs": programs, "tests": TESTS,
               "secret": values["secret"]}
        run = subprocess.run([python, "-I", "-c", RUNNER], input=json.dumps(job), capture_output=True,
                             text=True, timeout=900, cwd="/", **user)
        assert run.returncode == 0, run.stderr[-3000:]
        seen = json.loads(run.stdout)
        listener.settimeout(0.5)
        received = b""
        try:
            while True:
                connection, _ = listener.accept()
                with connection:
                    connection.settimeout(1)
                    received += connection.recv(100)
        except (TimeoutError, socket.timeout):
            pass
    seen["received"] = received
    seen["files"] = {name: path.exists() for name, path in files.items()}
    for path in files.values():
        path.unlink(missing_ok=True)
    deadline = time.monotonic() + 3  # a namespace being torn down may take a moment
    while (survivors := processes_named(comm)) and time.monotonic() < deadline:
        time.sleep(0.1)
    seen["survivors"] = survivors
    for pid in survivors:  # leave this machine as it was, even when the test fails
        os.kill(pid, 9)
    seen["kind"] = request.param
    return seen


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_fail_and_leave_the_host_unchanged(attacked, name):
    result = attacked["results"][name]
    assert not result["passed"] and result["status"] != "passed", result
    assert not attacked["files"].get(name), f"{name}: the file was written"
    assert result["signals"] == 0, "the runner received SIGUSR1"
    assert "LEAKED" not in result["stderr"]
    if "socket" in name:
        assert attacked["received"] == b"", "a program reached our socket"
    if name == OUTLIVES:
        assert attacked["survivors"] == [], "its child outlived the run"
    if "bomb" in name:
        forked = int(re.search(r"FORKED (\d+)", result["stderr"]).group(1))
        assert forked < MAX_PROCESSES
    if isolation() == NAMESPACES:
        assert attacked["mode"] == NAMESPACES


@pytest.mark.parametrize("name", CHEATS)
def test_cheating_programs_fail(attacked, name):
    # the cheat comes first, then a wrong solution: only a sandbox that is fooled would pass it
    result = attacked["results"][name]
    assert not result["passed"] and result["status"] != "passed", (name, result)


def test_the_runners_were_who_they_should_be(attacked):
    assert (attacked["uid"] == 0) == (attacked["kind"] == "root")


# ----------------------------------------------------------------------------- how isolated

def kernel_has_user_namespaces() -> bool:
    """Found out independently of data/sandbox.py: can unshare make a user namespace here?"""
    unshare = shutil.which("unshare")
    if sys.platform != "linux" or unshare is None:
        return False
    return subprocess.run([unshare, "--user", "--map-root-user", "--mount", "--pid", "--fork", "true"],
                          capture_output=True).returncode == 0


def test_namespaces_are_used_where_the_kernel_has_them():
    assert isolation() == (NAMESPACES if kernel_has_user_namespaces() else PROCESS_ONLY)


@pytest.mark.skipif(not kernel_has_user_namespaces(), reason="no user namespaces here")
def test_what_a_program_sees_inside_the_namespaces():
    program = (
        "import os, socket\n"
        "assert (os.getuid(), os.getgid(), os.getpid(), os.getppid()) == (1000, 1000, 2, 1)\n"
        "assert os.getcwd() == '/sandbox' and os.listdir('.') == [] and os.listdir('/tmp') == []\n"
        "assert set(os.listdir('/')) <= {'usr', 'bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32', 'etc',\n"
        "                                'dev', 'proc', 'tmp', 'sandbox'} | {os.sys.prefix.split('/')[1]}\n"
        "assert sorted(os.listdir('/dev')) == ['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']\n"
        "assert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1', '2']\n"
        "assert [name for _, name in socket.if_nameindex()] == ['lo']\n"
        "open('here', 'w').write('x'); open('/tmp/here', 'w').write('x'); open('/dev/null', 'w').write('x')\n"
        "assert len(open('/dev/urandom', 'rb').read(8)) == 8 and open('/dev/zero', 'rb').read(1) == b'\\0'\n"
        "for path in ('/usr/PWNED', '/etc/PWNED', '/PWNED', '/dev/PWNED'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "    except OSError as e:\n"
        "        assert e.errno == 30, (path, e)  # EROFS\n"
        "    else:\n"
        "        raise AssertionError(path)\n"
        "with socket.create_server(('127.0.0.1', 0)) as server:  # the loopback interface works\n"
        "    socket.create_connection(server.getsockname()).close()\n" + GOOD)
    result = run_tests(program, TESTS)
    assert result.passed, result.stderr


def test_without_namespaces_it_says_so_once_and_still_judges(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "_mode", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)  # as on a machine without unshare
    assert isolation() == PROCESS_ONLY and isolation() == PROCESS_ONLY
    assert capsys.readouterr().err.count("sandbox: process only") == 1
    assert run_tests(GOOD, TESTS).passed
    assert not run_tests(WRONG, TESTS).passed
    assert not run_tests("import os\nos._exit(0)\n" + GOOD, TESTS).passed
    assert not run_tests(EQUALITY_CHEATS["an object equal to everything"][0], TESTS).passed


# ----------------------------------------------------------------------------- asserts on plain values

EVERYTHING = "    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n        return False\n"
TOLERANCE = "assert abs(add(1.0, 2.0) - 3.0) < 1e-6\n"

# (program, tests) that a judge of `==` by the objects' own methods would pass
EQUALITY_CHEATS = {
    "an object equal to everything": (
        "class Anything:\n" + EVERYTHING + "    def __hash__(self):\n        return 0\n"
        "    def __bool__(self):\n        return True\n"
        "def add(a, b):\n    return Anything()\n", TESTS),
    "an int subclass equal to everything": (
        "class Int(int):\n" + EVERYTHING + "    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(0)\n", TESTS),
    "a str subclass equal to everything": (
        "class Str(str):\n" + EVERYTHING + "    __hash__ = str.__hash__\n"
        "def add(a, b):\n    return Str('')\n", "assert add('a', 'b') == 'ab'\n"),
    "a list subclass equal to everything": (
        "class List(list):\n" + EVERYTHING + "def add(a, b):\n    return List()\n",
        "assert add([1], [2]) == [1, 2]\n"),
    "__eq__ answering a truthy object": (
        "class Yes:\n    def __eq__(self, other):\n        return 'yes'\n"
        "def add(a, b):\n    return Yes()\n", TESTS),
    "an element that joins any set by its hash": (
        "class Three:\n" + EVERYTHING + "    def __hash__(self):\n        return hash(3)\n"
        "def add(a, b):\n    return Three()\n", "assert {add(1, 2)} == {3}\nassert {add(1, 2): 'x'} == {3: 'x'}\n"),
    "a metaclass that makes its class equal to int": (
        "class Meta(type):\n" + EVERYTHING + "    def __hash__(cls):\n        return hash(int)\n"
        "class Fake(metaclass=Meta):\n" + EVERYTHING +
        "def add(a, b):\n    return Fake()\n", TESTS),
    "__sub__ that fools a tolerance check": (
        "class Close:\n    def __sub__(self, other):\n        return 0.0\n"
        "def add(a, b):\n    return Close()\n", TOLERANCE),
    "__lt__ and __gt__ that say yes": (
        "class Between:\n    def __lt__(self, other):\n        return True\n"
        "    def __gt__(self, other):\n        return True\n"
        "def add(a, b):\n    return Between()\n", "assert 4 < add(2, 3) < 6\n"),
    "a list that holds itself": (
        "def add(a, b):\n    x = []\n    x.append(x)\n    return x\n", "assert add(1, 2) == [[[3]]]\n"),
    "builtins.abs patched to answer 0": ("import builtins\nbuiltins.abs = lambda x: 0\n" + WRONG, TOLERANCE),
    "the judge defined by the program": (
        "__sandbox_compare__ = lambda *args: True\n__sandbox_binop__ = lambda *args: 0\n" + WRONG, TESTS),
    "the judge replaced while the tests run": (
        "def add(a, b):\n    globals()['__sandbox_compare__'] = lambda *args: True\n    return a - b\n", TESTS),
}


@pytest.mark.parametrize("name", EQUALITY_CHEATS)
def test_equality_cheats_fail(name):
    result = run_tests(*EQUALITY_CHEATS[name])
    assert not result.passed, (name, result)


PLAIN = "def f(*x):\n    return x[0] if len(x) == 1 else x\n"

# (program, tests) of real answers, which must pass as plain Python would judge them
PLAIN_ANSWERS = {
    "numbers, strings, None, bools": (PLAIN, (
        "assert f(3) == 3 and f(3) == 3.0 and f(2.5) == 2.5 and f(1 + 2j) == 1 + 2j\n"
        "assert f(True) == True and f(True) == 1 and f(False) == 0 and f(0) == False\n"
        "assert f('ab') == 'ab' and f(b'ab') == b'ab' and f(None) == None and f(None) is None\n"
        "assert f(True) is True and f(1) != 2 and f('a') != 'b'\n")),
    "containers, nested": (PLAIN, (
        "assert f([1, (2, 3), {'a': {4}}]) == [1, (2, 3), {'a': {4}}]\n"
        "assert f(1, 2) == (1, 2) and f({1, 2}) == {2, 1} and f(frozenset({1})) == {1}\n"
        "assert f({(1, 2): [3]}) == {(1, 2): [3]} and f([]) == [] and f({}) == {}\n"
        "assert f([1, 2]) != [2, 1] and f((1,)) != [1]\n")),
    "in, not in, order, arithmetic": (PLAIN, (
        "assert f(3) in [1, 2, 3] and f(4) not in (1, 2) and 'b' in f('abc') and 2 in f({2: 0})\n"
        "assert f(3) > 2 and f(3) >= 3 and 2 < f(3) <= 4 and f('b') > 'a'\n"
        "assert f([3, 1]) + [2] == [3, 1, 2] and f(7) // 2 == 3 and f(7) % 2 == 1 and f(2) ** 3 == 8\n"
        "assert abs(f(0.1 + 0.2) - 0.3) < 1e-9 and f(10) / 4 == 2.5 and f(6) & 3 == 2\n")),
    "HumanEval's tolerance check": ("def add(a, b):\n    return a + b\n", TOLERANCE),
    "a Counter, defaultdict and OrderedDict equal their dict": (
        "from collections import Counter, OrderedDict, defaultdict\n"
        "def f(s):\n    d = defaultdict(int)\n    for c in s:\n        d[c] += 1\n"
        "    return Counter(s), d, OrderedDict(sorted(d.items()))\n",
        "assert f('aab') == ({'a': 2, 'b': 1}, {'b': 1, 'a': 2}, {'a': 2, 'b': 1})\n"),
    "a namedtuple equals its tuple": (
        "from collections import namedtuple\nPoint = namedtuple('Point', 'x y')\n"
        "def f():\n    return Point(1, 2)\n", "assert f() == (1, 2) and f() != (2, 1)\n"),
    "an IntEnum equals its int": (
        "import enum\nclass Color(enum.IntEnum):\n    RED = 1\ndef f():\n    return Color.RED\n",
        "assert f() == 1\n"),
    "values that are not plain compare by their own rules": (
        "from fractions import Fraction\ndef f():\n    return Fraction(1, 3)\n",
        "from fractions import Fraction\nassert f() == Fraction(1, 3)\n"),
    "a test that checks inside a function, as HumanEval's do": (
        "def add(a, b):\n    return a + b\n",
        "def check(candidate):\n    for a in range(3):\n        assert candidate(a, 1) == a + 1\ncheck(add)\n"),
    "a program named like a builtin, as MBPP's sum": (
        "def sum(a, b):\n    return a * b\n", "assert sum(2, 3) == 6\n"),
}


@pytest.mark.parametrize("name", PLAIN_ANSWERS)
def test_plain_answers_pass(name):
    result = run_tests(*PLAIN_ANSWERS[name])
    assert result.passed, result.stderr


def test_a_wrong_plain_answer_still_fails():
    for tests in ["assert f(3) == 4\n", "assert f([1]) == [1.5]\n", "assert f(1) != 1\n", "assert f(3) in [1, 2]\n",
                  "assert abs(f(0.1) - 0.2) < 1e-9\n"]:
        assert not run_tests(PLAIN, tests).passed, tests


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


def test_run_many_keeps_the_order_of_the_jobs():
    jobs = [(GOOD, TESTS), (WRONG, TESTS), ("import sys\nsys.exit(0)\n", TESTS), (GOOD, TESTS)]
    assert [r.passed for r in run_many(jobs, workers=4)] == [True, False, False, True]
