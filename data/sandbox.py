"""Run untrusted, model-generated Python against its tests in a separate, isolated process.

The code reward of paper section 2 (MBPP) and the pass@1 of section 4 (HumanEval) run code
written by the model. That code is untrusted, and a policy trained by REINFORCE on the verdict
is optimised to pass the tests by any means: it may loop, eat memory, fork, write files, exit
early, tamper with the test machinery, or return an object that equals everything.
`run_tests(program, tests)` runs the program, then its tests, in a fresh Python process and says
whether every test ran and passed. `isolation()` says how well that process is isolated.

The verdict: a secret nonce, written only after the last test.
    The parent makes a random nonce per run and sends it, with the program and the compiled
    tests, through a pipe. The harness (HARNESS below, trusted code that runs first in the child)
    reads the pipe to its end and closes it, compiles the program with asserts on (optimize=0),
    keeps the nonce only in the closure of a `report` function, and keeps its own references to
    `exec`, `sys.settrace` and `os.write`, so a program that patches builtins or modules cannot
    change what the harness does next. It runs the program, switches off any trace function the
    program set, runs the tests (with the builtins as they were before the program ran), and only
    then writes the nonce to a second pipe. The parent gives a pass only if that pipe holds exactly
    the nonce and the process exited with status 0: exiting early, printing a fake success line,
    redefining AssertionError or __builtins__, or raising inside the tests all fail.

Asserts judge plain values (`judged`).
    Every comparison and arithmetic operator inside the tests' asserts is rewritten into a call of
    the harness: where one side is a plain value (int, float, complex, str, bytes, bool, None, or a
    list, tuple, dict, set or frozenset of plain values) the other side is rebuilt as one from its
    builtin storage, without calling any of its methods, before the operator runs. So an object
    whose __eq__ (or __ne__, __bool__, __hash__, __sub__...) says what the test wants never equals
    a plain expected value; a Counter, a namedtuple or an int subclass compares by its contents; and
    real answers compare as before (HumanEval's `abs(x - y) < 1e-6` included). Not covered: values
    the tests compute by calling methods of the program's objects, a Fraction or Decimal (not plain:
    never equal to a plain value), a program that defines a global with a builtin's name the tests
    call (MBPP's own `sum` is one), and code that digs through interpreter memory (gc, frames,
    ctypes) for the nonce or the harness's functions.

Isolation, "namespaces" (Linux 5.12+ with user namespaces, whether we run as root or not):
    util-linux `unshare --mount --pid --net --ipc --uts --fork --kill-child` (plus `--user
    --map-root-user` when we are not root) starts the harness as PID 1 of new namespaces, still
    root in them. It builds a new root filesystem on a tmpfs: read-only, nosuid binds of the
    system folders (/usr, /bin, /sbin, /lib*, /etc) and of the interpreter's own folders, five
    devices (/dev/null, zero, full, random, urandom), a /proc of its own PID namespace, and two
    writable, size-limited tmpfs: /tmp and the working folder /sandbox. It pivots into that root
    and detaches the host's, brings up the loopback interface (the only one there is), then forks
    the worker, which becomes uid 1000 in a user namespace of its own, mapped to a throwaway uid
    (when we run as root) or to our own (when not); it has no capabilities and no_new_privs set.
    The worker sets the limits and runs program and tests; PID 1 waits for it, and its exit kills
    everything the program started. So the program cannot write anything that outlives the run,
    read the project, home folders, /var or /run, reach any network or our ports, see or signal a
    process outside, or act as root on the host. Still shared with the host: the kernel itself,
    CPU time and memory (beyond the limits below), and, read-only, the system folders and the
    interpreter's (so whatever the worker's host uid may read there).

Isolation, "process only" (macOS, a Linux without user namespaces or unshare; said once on
stderr): a fresh working folder and the limits below only. As root, each run gets a throwaway
user id if it can run the interpreter; then it cannot write outside its folder and /tmp nor signal
our processes. Otherwise the program can read and write whatever we may, reach the network, and
signal our processes; a Python-level guard makes that harder, not impossible.

Both modes: a wall-clock timeout, after which the child's process group is killed; CPU seconds,
address space (memory_mb), file size (16 MB), no core files and a number of processes
(RLIMIT_NPROC, where it applies), set by the harness before any untrusted code runs; process
creation and signals (os.fork, subprocess, os.kill, ...) replaced by functions that raise (ctypes
gets around that: it is a guard, not the wall); a minimal environment (PATH, HOME, TMPDIR, LANG);
stdin is /dev/null.
"""
import ast
import functools
import itertools
import marshal
import os
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

FILE_LIMIT_MB = 16   # largest file the program may write (stdout and stderr included)
TMPFS_MB = 64        # size of each writable tmpfs (/tmp, the working folder) under namespaces
MAX_PROCESSES = 32   # tasks (processes and threads) a run may have, where RLIMIT_NPROC applies
STDERR_TAIL = 2000   # characters of stderr kept in the result
UID_RANGE = (50_000, 60_000)  # throwaway user ids used when we run as root; rarely used by real accounts
NAMESPACES, PROCESS_ONLY = "namespaces", "process only"   # the two values of isolation()
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
WORKDIR = "/sandbox"  # the program's working folder inside the namespaces
INSIDE_UID = 1000     # who the program is inside its user namespace

# The trusted start of the child process. Every name it uses after the program has run is
# a local variable bound before, so patching builtins or modules cannot change it.
HARNESS = r'''
import builtins, marshal, os, resource, sys

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

# ------------------------------------------------------------------ judging asserts on plain values

def make_judge():
    """compare and binop, which the rewritten asserts call (see judged() in data/sandbox.py)."""
    type_, id_, len_, range_ = type, id, len, range
    base_of = type.__dict__["__base__"].__get__  # the base whose memory layout a class extends: a
                                                 # metaclass's mro() can fake issubclass, not this
    RecursionError_, TypeError_ = RecursionError, TypeError
    exact = {id_(t): t for t in (bool, int, float, complex, str, bytes, type(None),
                                 list, tuple, dict, set, frozenset)}
    scalar = {int: int.__int__, float: float.__float__, complex: complex.__complex__,  # an exact copy
              str: str.__str__, bytes: bytes.__bytes__, bool: None, type(None): None}
    list_, tuple_, dict_, set_, frozenset_ = list, tuple, dict, set, frozenset
    list_iter, tuple_iter, set_iter, frozenset_iter, dict_items = (
        list.__iter__, tuple.__iter__, set.__iter__, frozenset.__iter__, dict.items)

    class NotPlain(Exception):
        pass

    def plain(x, strict):
        """x rebuilt from builtin types, read from its builtin storage so that none of its own
        methods run; strict: subclasses refused too (the values the tests themselves wrote)."""
        t = base = type_(x)
        while exact.get(id_(base)) is None:  # by id: a metaclass could fake == and hash of a type
            base = None if strict else base_of(base)
            if base is None:
                raise NotPlain
        if base in scalar:
            return x if base is t else scalar[base](x)
        if base is list_:
            return [plain(v, strict) for v in list_iter(x)]
        if base is tuple_:
            return tuple_(plain(v, strict) for v in tuple_iter(x))
        if base is dict_:
            return {plain(k, strict): plain(v, strict) for k, v in dict_items(x)}
        if base is set_:
            return set_(plain(v, strict) for v in set_iter(x))
        return frozenset_(plain(v, strict) for v in frozenset_iter(x))

    def judge(a, b):
        """(a, b) to compare: where one side is plain, the other made plain (NotPlain if it cannot be)."""
        for i in range_(2):
            expected, other = (b, a) if i == 0 else (a, b)
            try:
                plain(expected, True)
            except (NotPlain, RecursionError_):
                continue
            try:
                other = plain(other, False)
            except RecursionError_:
                raise NotPlain
            return (other, expected) if i == 0 else (expected, other)
        return a, b  # neither is plain: their own rules

    operators = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
                 "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
                 "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
                 "is": lambda a, b: a is b, "is not": lambda a, b: a is not b,
                 "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                 "/": lambda a, b: a / b, "//": lambda a, b: a // b, "%": lambda a, b: a % b,
                 "**": lambda a, b: a ** b, "@": lambda a, b: a @ b, "<<": lambda a, b: a << b,
                 ">>": lambda a, b: a >> b, "&": lambda a, b: a & b, "|": lambda a, b: a | b,
                 "^": lambda a, b: a ^ b}
    unequal = {"==": False, "in": False, "!=": True, "not in": True}  # a non-plain value vs a plain one

    def compare(ops, *operands):
        """operands[0] ops[0] operands[1] ops[1] ...: a chained comparison, operands evaluated up front."""
        for i in range_(len_(ops)):
            op, a, b = ops[i], operands[i], operands[i + 1]
            if op != "is" and op != "is not":  # identity cannot be faked
                try:
                    a, b = judge(a, b)
                except NotPlain:
                    if op not in unequal:
                        raise TypeError_(f"'{op}' between a plain value and one that is not")
                    if unequal[op]:
                        continue
                    return False
            if not operators[op](a, b):
                return False
        return True

    def binop(op, a, b):
        try:
            a, b = judge(a, b)
        except NotPlain:
            raise TypeError_(f"'{op}' between a plain value and one that is not")
        return operators[op](a, b)

    return compare, binop

# ------------------------------------------------------------------ namespaces (Linux)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 1, 2, 4, 8, 4096, 16384
MNT_DETACH, AT_FDCWD, AT_RECURSIVE, CLONE_NEWUSER = 2, -100, 0x8000, 0x10000000
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 1, 2
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 1

def libc():
    """ctypes, and call(name, *args): the C library's function (ints passed as C longs, which
    variadic functions such as syscall and prctl need), an OSError where it returns -1."""
    import ctypes
    lib = ctypes.CDLL(None, use_errno=True)
    def call(name, *args):
        result = getattr(lib, name)(*(ctypes.c_long(a) if type(a) is int else a for a in args))
        if result == -1:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{name}: {os.strerror(errno)}")
        return result
    return ctypes, call

def build_root(ns, ctypes, call):
    """As PID 1, still root in the new namespaces: the sandbox's root filesystem, then pivot into it."""
    os.umask(0o022)  # the folders made here must be searchable by the worker's uid
    new = "/tmp"  # a mount point: the host's /tmp is covered only inside this mount namespace
    sources = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC), os.path.isdir(path))  # opened first:
               for path in ns["binds"] + ns["devices"]]                               # some may lie under /tmp
    call("mount", b"tmpfs", new.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m")
    for path, fd, is_dir in sources:
        target = new + path
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        call("mount", f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND | MS_REC, None)
        os.close(fd)
    for path, dest in ns["links"]:
        os.makedirs(os.path.dirname(new + path), exist_ok=True)
        os.symlink(dest, new + path)
    os.makedirs(new + "/dev", exist_ok=True)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(dest, f"{new}/dev/{name}")
    for path in ("/proc", "/tmp", ns["workdir"]):
        os.makedirs(new + path, exist_ok=True)
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)  # not nodev: /dev/null
    call("syscall", 442, AT_FDCWD, new.encode(), AT_RECURSIVE, ctypes.byref(attr), 32)  # mount_setattr
    call("mount", b"proc", f"{new}/proc".encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    size = f"size={ns['tmpfs_mb']}m,nr_inodes=16k,mode=1777".encode()
    for path in ("/tmp", ns["workdir"]):
        call("mount", b"tmpfs", (new + path).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, size)
    os.chdir(new)
    call("pivot_root", b".", b".")      # the host's root now lies on top of ours, at "/"...
    call("umount2", b".", MNT_DETACH)   # ...and is detached: nothing of it is left to climb back to
    os.chdir(ns["workdir"])
    loopback_up(ctypes, call)

def loopback_up(ctypes, call):
    """The new network namespace has one interface, lo, and it starts down."""
    fd = call("socket", 2, 2, 0)  # AF_INET, SOCK_DGRAM: any socket will do for the ioctl
    request = ctypes.create_string_buffer(b"lo", 40)  # struct ifreq: name, then the flags (a short)
    call("ioctl", fd, SIOCGIFFLAGS, request)
    flags = int.from_bytes(request[16:18], sys.byteorder) | IFF_UP
    request[16:18] = flags.to_bytes(2, sys.byteorder)
    call("ioctl", fd, SIOCSIFFLAGS, request)
    os.close(fd)

def drop_privileges(ns, ctypes, call):
    """The worker: uid INSIDE_UID in a user namespace of its own, no capabilities, no way to gain any."""
    if ns["uid"] is not None:  # we are root on the host: become a throwaway user there first
        os.setgroups([])
        os.setresgid(ns["uid"], ns["uid"], ns["uid"])
        os.setresuid(ns["uid"], ns["uid"], ns["uid"])
        call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change cleared it: /proc/self would be root's
    uid, gid = os.geteuid(), os.getegid()
    call("unshare", CLONE_NEWUSER)
    for name, text in (("uid_map", f"{ns['inside']} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{ns['inside']} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    call("capset", ctypes.byref(header), ctypes.byref((ctypes.c_uint32 * 6)()))  # all sets empty
    call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)

def init(result_fd):
    """PID 1 waits for the worker, reaping orphans on the way; when it exits, the kernel kills every
    other process of the namespace. A signal's number comes back as 128 + n (PID 1 cannot be
    killed by its own namespace, so it cannot die of the same signal)."""
    worker = os.fork()
    if worker == 0:
        return
    os.close(result_fd)  # only the worker reports
    while True:
        pid, status = os.wait()
        if pid == worker:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)

# ------------------------------------------------------------------ the run

def main():
    job_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(job_fd, "rb") as pipe:  # read to the end and close: nothing is left to read later
        job = marshal.loads(pipe.read())
    ns = job["namespaces"]
    if ns is not None:
        ctypes, call = libc()
        build_root(ns, ctypes, call)
        init(result_fd)
        drop_privileges(ns, ctypes, call)
    set_limits(**job["limits"])
    program = compile(job["program"], "<program>", "exec", dont_inherit=True, optimize=0)
    tests = marshal.loads(job["tests"])  # compiled by the parent, asserts rewritten by judged()
    report = make_report(result_fd, job.pop("nonce").encode())
    compare, binop = make_judge()
    pristine = dict(builtins.__dict__)  # the builtins as they are before the program can patch them
    del job
    run, settrace, setprofile, exit, errors = exec, sys.settrace, sys.setprofile, os._exit, Exception
    streams = (sys.stdout, sys.stderr)
    forbid_processes()
    namespace = {"__name__": "solution"}  # not "__main__": example code under `if __name__ == ...` stays off
    run(program, namespace)
    settrace(None)
    setprofile(None)
    checks = namespace.copy()  # the tests' globals: the program's names, our builtins and judge
    checks["__builtins__"] = pristine
    checks["__sandbox_compare__"] = compare
    checks["__sandbox_binop__"] = binop
    run(tests, checks)
    report()
    for stream in streams:  # then exit at once: the verdict is in, and the interpreter's teardown takes time
        try:
            stream.flush()
        except errors:
            pass  # the program closed it
    exit(0)

main()
'''


@dataclass
class SandboxResult:
    passed: bool            # every test ran and passed
    status: str             # passed | failed | timeout | killed | no_report | error
    returncode: int | None  # exit status of the child; negative: killed by that signal
    stderr: str             # the last STDERR_TAIL characters of its stderr
    seconds: float          # wall-clock time of the run


# ----------------------------------------------------------------------------- the tests, judged

COMPARE_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
               ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}
BIN_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&",
           ast.BitOr: "|", ast.BitXor: "^"}


class JudgeOperators(ast.NodeTransformer):
    """`a == b` -> __sandbox_compare__(("==",), a, b); `a - b` -> __sandbox_binop__("-", a, b)."""

    def visit_Compare(self, node: ast.Compare) -> ast.Call:
        self.generic_visit(node)
        ops = ast.Tuple([ast.Constant(COMPARE_OPS[type(op)]) for op in node.ops], ast.Load())
        return ast.copy_location(ast.Call(ast.Name("__sandbox_compare__", ast.Load()),
                                          [ops, node.left, *node.comparators], []), node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.Call:
        self.generic_visit(node)
        return ast.copy_location(ast.Call(ast.Name("__sandbox_binop__", ast.Load()),
                                          [ast.Constant(BIN_OPS[type(node.op)]), node.left, node.right], []), node)


@functools.lru_cache(maxsize=4096)  # an RL step scores many samples of each problem against the same tests
def judged(tests: str) -> bytes:
    """The tests compiled (marshalled) with the operators of every assert judged by the harness;
    tests that do not parse are sent as source, for the child to report the error."""
    try:
        tree = ast.parse(tests, "<tests>")
    except (SyntaxError, ValueError):
        return marshal.dumps(tests)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            node.test = JudgeOperators().visit(node.test)
    code = compile(ast.fix_missing_locations(tree), "<tests>", "exec", dont_inherit=True, optimize=0)
    return marshal.dumps(code)


# ----------------------------------------------------------------------------- how isolated

_mode: str | None = None
_mode_lock = threading.Lock()
_next_uid = itertools.count(random.randrange(UID_RANGE[1] - UID_RANGE[0]))
_uid_works: bool | None = None  # found out once per process


def isolation() -> str:
    """NAMESPACES ("namespaces") where programs run in Linux namespaces, else PROCESS_ONLY
    ("process only"), said once on stderr. Found out once per process by running one program."""
    global _mode
    with _mode_lock:
        if _mode is None:
            problem = namespace_problem()
            _mode = PROCESS_ONLY if problem else NAMESPACES
            if problem:
                print(f"WARNING: sandbox: process only. Generated code runs without namespaces ({problem}): "
                      "it can read and write what this user may, reach the network and signal processes "
                      "(see data/sandbox.py)", file=sys.stderr, flush=True)
    return _mode


def namespace_problem() -> str | None:
    """Why programs cannot run in namespaces here, or None when a probe program ran in them."""
    if sys.platform != "linux":
        return f"{sys.platform} is not Linux"
    if shutil.which("unshare") is None:
        return "util-linux unshare not found"
    probe = run_once("import os\nuid = os.getuid()\n", f"assert uid == {INSIDE_UID}\n", timeout=30,
                     memory_mb=1024, namespaces=True)
    if probe.passed:
        return None
    lines = probe.stderr.strip().splitlines()
    return f"a probe run {probe.status}: {lines[-1] if lines else 'no output'}"


@functools.lru_cache(maxsize=1)
def sandbox_root() -> dict:
    """What the harness puts into the sandbox's root: binds (read-only) of the system folders and
    of the interpreter's own, symbolic links for those that are links here (/lib -> usr/lib)."""
    binds, links = [], []

    def covered(path: str) -> bool:
        return any(path == b or path.startswith(b + "/") for b in binds)

    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(path)
    interpreter = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable)}
    for path in sorted(interpreter, key=len):  # a folder before the folders inside it
        real = os.path.realpath(path)
        if not covered(real):
            binds.append(real)
        if path != real and not covered(path) and os.path.realpath(os.path.dirname(path)) == os.path.dirname(path):
            links.append((path, real))
    return {"binds": binds, "links": links, "devices": [d for d in DEVICES if os.path.exists(d)],
            "workdir": WORKDIR, "inside": INSIDE_UID, "tmpfs_mb": TMPFS_MB}


def next_uid() -> int:
    return UID_RANGE[0] + next(_next_uid) % (UID_RANGE[1] - UID_RANGE[0])


def throwaway_uid() -> int | None:
    """Process only: a fresh user id for this run when we are root and it can run our interpreter, else None."""
    global _uid_works
    if os.geteuid() != 0:
        return None
    uid = next_uid()
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
    """Process only: RLIMIT_NPROC for the child. It counts every task of the user, so leave room
    for those the user already has. None where it would not apply (root)."""
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


def exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the child's exit, at most timeout seconds. A pidfd wakes us the moment it exits;
    Popen.wait(timeout) polls with sleeps that double up to 50 ms, which would cost most runs
    half of their time."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def verdict(timed_out: bool, returncode: int, report: bytes, nonce: bytes) -> str:
    if timed_out:
        return "timeout"
    if returncode < 0:
        return "killed"  # SIGXCPU (CPU limit), SIGXFSZ (file size), SIGKILL, SIGSEGV...
    if returncode != 0:
        return "failed"  # an exception: failed assert, syntax error, MemoryError...
    return "passed" if report == nonce else "no_report"  # exit 0 without the nonce: exited early


def command(namespaces: bool, job_r: int, result_w: int) -> list[str]:
    # -I: ignore PYTHON* variables and user site; -S: no site-packages (the tasks need the
    # standard library only, and start-up is faster); -B: write no .pyc files
    python = [sys.executable, "-I", "-S", "-B", "-c", HARNESS, str(job_r), str(result_w)]
    if not namespaces:
        return python
    user = ["--user", "--map-root-user"] if os.geteuid() != 0 else []  # root needs no user namespace to mount
    return [shutil.which("unshare"), *user, "--mount", "--pid", "--net", "--ipc", "--uts", "--fork",
            "--kill-child", *python]


def run_tests(program: str, tests: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` then `tests` (plain asserts) in a sandboxed child; see the file docstring."""
    return run_once(program, tests, timeout, memory_mb, namespaces=isolation() == NAMESPACES)


def run_once(program: str, tests: str, timeout: float, memory_mb: int, namespaces: bool) -> SandboxResult:
    began = time.monotonic()
    nonce = secrets.token_hex(16).encode()
    if namespaces:  # a private tmpfs is the working folder; the namespaces' end kills every process
        workdir, uid = "/", None
        ns = {**sandbox_root(), "uid": next_uid() if os.geteuid() == 0 else None}
        env_dirs, processes = {"HOME": WORKDIR, "TMPDIR": "/tmp"}, MAX_PROCESSES
    else:
        uid, ns = throwaway_uid(), None
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        if uid is not None:
            os.chown(workdir, uid, uid)
        env_dirs, processes = {"HOME": workdir, "TMPDIR": workdir}, process_limit(uid)
    limits = {"cpu_seconds": int(timeout) + 1, "memory_bytes": memory_mb << 20,
              "file_bytes": FILE_LIMIT_MB << 20, "processes": processes}
    job = marshal.dumps({"program": program, "tests": judged(tests), "nonce": nonce.decode(),
                         "limits": limits, "namespaces": ns})
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env_dirs}
    user = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    job_r, job_w = os.pipe()
    result_r, result_w = os.pipe()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(command(namespaces, job_r, result_w), cwd=workdir, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        pass_fds=(job_r, result_w), start_new_session=True, **user)
            except OSError as e:  # could not start the child at all
                os.close(job_w)
                return SandboxResult(False, "error", None, repr(e), time.monotonic() - began)
            finally:
                os.close(job_r)  # the child has its own copies now
                os.close(result_w)
            send(job_w, job)
            timed_out = not exited(proc, timeout)
            kill_everything(proc.pid, uid)
            proc.wait()
            report = read_available(result_r)
            err.seek(max(0, err.seek(0, os.SEEK_END) - 4 * STDERR_TAIL))  # the tail, not all 16 MB
            stderr = err.read().decode("utf-8", errors="replace")[-STDERR_TAIL:]
    finally:
        os.close(result_r)
        if not namespaces:
            shutil.rmtree(workdir, ignore_errors=True)
    code = proc.returncode
    if namespaces and code > 128:  # PID 1 passes on the worker's signal as 128 + n (see init in HARNESS)
        code = 128 - code
    status = verdict(timed_out, code, report, nonce)
    return SandboxResult(status == "passed", status, code, stderr, time.monotonic() - began)


def run_many(jobs: list[tuple[str, str]], workers: int = 4, timeout: float = 10.0,
             memory_mb: int = 1024) -> list[SandboxResult]:
    """run_tests on many (program, tests) pairs in parallel; results in the order of jobs.
    Threads are enough: each run waits on its own child process."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_tests(*job, timeout=timeout, memory_mb=memory_mb), jobs))
