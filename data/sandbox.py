"""Run untrusted, model-generated Python against its tests in a separate, limited process.

The code reward of paper section 2 (MBPP) and the pass@1 of section 4 (HumanEval) run code
written by the model. That code is untrusted: it may loop forever, eat memory, fork, write
files, exit early, or tamper with the test machinery. `run_tests(program, tests)` runs the
program and then its tests in a fresh Python process and says whether every test ran and passed.

The verdict: a secret nonce, written only after the last test.
    The parent makes a random nonce per run and sends it, with the program and the tests,
    through a pipe. The harness (HARNESS below, trusted code that runs first in the child)
    reads the pipe to its end and closes it, compiles program and tests with asserts on
    (optimize=0, so `python -O` tricks cannot drop them), keeps the nonce only in the closure
    of a `report` function, and keeps its own references to `exec`, `sys.settrace` and
    `os.write` so a program that patches builtins or modules cannot change what the harness
    does next. It then runs the program, switches off any trace function the program set
    (a trace function could jump over a failing assert), runs the tests, and only then writes
    the nonce to a second pipe. The parent gives a pass only if that pipe holds exactly the
    nonce and the process exited with status 0. So exiting early (sys.exit(0), os._exit(0),
    an excepthook), printing a fake success line, redefining AssertionError or __builtins__,
    or raising inside the tests all fail: none of them can produce a nonce the program never
    saw. Known limits: the nonce lives in the same interpreter as the program, so code that
    deliberately digs through interpreter memory (gc, frame objects, ctypes, /proc/self/mem)
    could find it; and a function that returns an object whose __eq__ always says True passes
    `assert f(x) == y` tests. Both need intent that plain generated solutions do not show.

Isolation (process level, not a container):
    - a wall-clock timeout; the child is in its own session and process group, which is
      killed (SIGKILL) after the run, so children it forked die too;
    - limits set by the harness before any untrusted code runs: CPU seconds, address space
      (memory_mb), size of any file written (16 MB), no core files, and a number of
      processes (RLIMIT_NPROC) where the kernel applies it (not to root). They are set there
      rather than in a Popen preexec_fn, which Python documents as unsafe in a program with
      threads (run_many's pool, a PyTorch trainer); the effect on the program is the same;
    - process creation and signals (os.fork, os.system, subprocess, os.kill, ...) replaced
      by functions that raise: a best-effort guard (ctypes can get around it), useful above
      all as root, where RLIMIT_NPROC does nothing;
    - run as root, each run gets a throwaway user id (when the interpreter can be read by
      other users): then RLIMIT_NPROC holds, every process of that id is killed afterwards,
      and the program cannot write outside its folder and /tmp, nor signal our processes;
    - a fresh temporary working folder, removed afterwards; a minimal environment (no
      secrets from ours: PATH, HOME and TMPDIR only); stdin is /dev/null (reads give EOF).
    Not isolated: the network, reading files that the user running it may read, and, when
    the child runs as our own user (or as root without a throwaway id), writing files and
    signalling processes that user may touch (the guard above only makes that harder).
"""
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

FILE_LIMIT_MB = 16   # largest file the program may write (stdout and stderr included)
MAX_PROCESSES = 32   # tasks (processes and threads) a run may have, where RLIMIT_NPROC applies
STDERR_TAIL = 2000   # characters of stderr kept in the result
UID_RANGE = (50_000, 60_000)  # throwaway user ids used when we run as root; rarely used by real accounts

# The trusted start of the child process. Every name it uses after the program has run is
# a local variable bound before, so patching builtins or modules cannot change it.
HARNESS = r'''
import json, os, resource, sys

def set_limits(cpu_seconds, memory_bytes, file_bytes, processes):
    limits = [(resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
              (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)]
    if processes is not None:
        limits.append((resource.RLIMIT_NPROC, processes))
    for kind, value in limits:
        resource.setrlimit(kind, (value, value))

def refuse(*args, **kwargs):
    raise PermissionError("the sandbox does not allow new processes or signals")

def forbid_processes():
    import _posixsubprocess  # what subprocess and multiprocessing use to start a process
    _posixsubprocess.fork_exec = refuse
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve", "kill", "killpg"):
        if hasattr(os, name):
            setattr(os, name, refuse)

def make_report(fd, nonce):
    write = os.write
    def report():
        write(fd, nonce)
    return report

def main():
    job_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(job_fd, "rb") as pipe:  # read to the end and close: nothing is left to read later
        job = json.loads(pipe.read())
    set_limits(**job["limits"])
    program = compile(job["program"], "<program>", "exec", dont_inherit=True, optimize=0)
    tests = compile(job["tests"], "<tests>", "exec", dont_inherit=True, optimize=0)
    report = make_report(result_fd, job.pop("nonce").encode())
    del job
    run, settrace, setprofile = exec, sys.settrace, sys.setprofile
    forbid_processes()
    namespace = {"__name__": "solution"}  # not "__main__": example code under `if __name__ == ...` stays off
    run(program, namespace)
    settrace(None)
    setprofile(None)
    run(tests, namespace)
    report()

main()
'''


@dataclass
class SandboxResult:
    passed: bool            # every test ran and passed
    status: str             # passed | failed | timeout | killed | no_report | error
    returncode: int | None  # exit status of the child; negative: killed by that signal
    stderr: str             # the last STDERR_TAIL characters of its stderr
    seconds: float          # wall-clock time of the run


# ----------------------------------------------------------------------------- who runs the child

_next_uid = itertools.count(random.randrange(UID_RANGE[1] - UID_RANGE[0]))
_uid_works: bool | None = None  # found out once per process


def throwaway_uid() -> int | None:
    """A fresh user id for this run when we are root and it can run our interpreter, else None."""
    global _uid_works
    if os.geteuid() != 0:
        return None
    uid = UID_RANGE[0] + next(_next_uid) % (UID_RANGE[1] - UID_RANGE[0])
    if _uid_works is None:
        try:  # e.g. fails when the interpreter lives under /root (mode 700)
            probe = subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], user=uid, group=uid,
                                   extra_groups=[], capture_output=True, timeout=30)
            _uid_works = probe.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _uid_works = False
    return uid if _uid_works else None


def count_tasks(uid: int) -> int | None:
    """Processes and threads that uid has now (RLIMIT_NPROC counts all of them), or None."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    total = 0
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass  # the process ended while we looked
    return total


def process_limit(uid: int | None) -> int | None:
    """RLIMIT_NPROC for the child: it counts every task of the user, so leave room for
    those the user already has. None where it would not apply (root)."""
    if uid is not None:
        return MAX_PROCESSES
    if os.geteuid() == 0:
        return None
    existing = count_tasks(os.getuid())
    return None if existing is None else existing + MAX_PROCESSES


def kill_everything(pgid: int, uid: int | None) -> None:
    """Kill the child's process group and, with a throwaway uid, every process of that uid
    (a process that called setsid() has left the group, but not the uid)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group
    if uid is not None:  # kill(-1) signals every process the caller may signal: all of that uid
        subprocess.run([sys.executable, "-I", "-S", "-c", "import os; os.kill(-1, 9)"],
                       user=uid, group=uid, extra_groups=[], capture_output=True, timeout=30)


# ----------------------------------------------------------------------------- one run

def read_available(fd: int) -> bytes:
    """What is in the pipe now, without waiting for writers that may never close it."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def send(fd: int, data: bytes) -> None:
    """Write the job and close the pipe, so the harness sees its end."""
    try:
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(data)
    except BrokenPipeError:
        pass  # the child died before reading its job; its exit status tells why


def verdict(timed_out: bool, returncode: int, report: bytes, nonce: bytes) -> str:
    if timed_out:
        return "timeout"
    if returncode < 0:
        return "killed"  # SIGXCPU (CPU limit), SIGXFSZ (file size), SIGKILL, SIGSEGV...
    if returncode != 0:
        return "failed"  # an exception: failed assert, syntax error, MemoryError...
    return "passed" if report == nonce else "no_report"  # exit 0 without the nonce: exited early


def start(workdir: str, uid: int | None, job_r: int, result_w: int, out, err) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    user = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    # -I: ignore PYTHON* variables and user site; -S: no site-packages (the tasks need the
    # standard library only, and start-up is faster); -B: write no .pyc files
    return subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", HARNESS, str(job_r), str(result_w)],
                            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                            pass_fds=(job_r, result_w), start_new_session=True, **user)


def run_tests(program: str, tests: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` then `tests` (plain asserts) in a sandboxed child; see the file docstring."""
    began = time.monotonic()
    nonce = secrets.token_hex(16).encode()
    uid = throwaway_uid()
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    limits = {"cpu_seconds": int(timeout) + 1, "memory_bytes": memory_mb << 20,
              "file_bytes": FILE_LIMIT_MB << 20, "processes": process_limit(uid)}
    job = json.dumps({"program": program, "tests": tests, "nonce": nonce.decode(), "limits": limits})
    job_r, job_w = os.pipe()
    result_r, result_w = os.pipe()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = start(workdir, uid, job_r, result_w, out, err)
            except OSError as e:  # could not start the child at all
                os.close(job_w)
                return SandboxResult(False, "error", None, repr(e), time.monotonic() - began)
            finally:
                os.close(job_r)  # the child has its own copies now
                os.close(result_w)
            send(job_w, job.encode())
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            kill_everything(proc.pid, uid)
            proc.wait()
            report = read_available(result_r)
            err.seek(max(0, err.seek(0, os.SEEK_END) - 4 * STDERR_TAIL))  # the tail, not all 16 MB
            stderr = err.read().decode("utf-8", errors="replace")[-STDERR_TAIL:]
    finally:
        os.close(result_r)
        shutil.rmtree(workdir, ignore_errors=True)
    status = verdict(timed_out, proc.returncode, report, nonce)
    return SandboxResult(status == "passed", status, proc.returncode, stderr, time.monotonic() - began)


def run_many(jobs: list[tuple[str, str]], workers: int = 4, timeout: float = 10.0,
             memory_mb: int = 1024) -> list[SandboxResult]:
    """run_tests on many (program, tests) pairs in parallel; results in the order of jobs.
    Threads are enough: each run waits on its own child process."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_tests(*job, timeout=timeout, memory_mb=memory_mb), jobs))
