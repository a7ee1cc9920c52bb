"""Bring a GPU sitting's returned files into the checkout (after benchmarks/gpu_sitting.sh).

    python benchmarks/import_sitting.py --name NAME CALL_DIR [CALL_DIR ...]

Each CALL_DIR holds what one device call sent back (`sitting.tar.gz.00`, `.01`, ... and maybe
`compile-cache.tar.00`, ...), given in the order the calls ran. For each call k (from 1):
- its logs, summary and small files go to benchmarks/results/sittings/NAME/call<k>/ (to commit,
  with a README.txt written by hand); inductor's autotune timings (`autotune/`) stay there too
  (small JSON: a later checkout has no .autotune) and are copied into .autotune/;
- its records (`results/*.jsonl`) are appended to benchmarks/results/<same name>, each line
  once: a line already there (the same record sent back by two calls) is not added again;
- its runs of #8 (`methods/<method>/`) go to runs/methods/<method>/ (ignored: last.pt included,
  to carry into a later call's `run methods`), and their config, metrics and summary also to
  call<k>/methods/ so the figure can be redrawn from the committed folder;
- a packed compile cache goes to .compile-cache/ (the latest call's wins).
Nothing is written when a CALL_DIR holds no archive, or one that does not read whole (a part
missing), or when NAME is taken: one line on stderr, exit 2.
"""
import argparse
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# of a run folder, what the committed sitting keeps (checkpoints stay in runs/methods only)
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


class NotImportable(Exception):
    pass


def _joined(call: Path, stem: str) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(call.glob(f"{stem}.[0-9]*")))


def read_call(call: Path):
    """The call's archive and packed compile cache (b"" if none), checked whole before anything
    is written: every part present and readable, every record a JSON line."""
    archive, cache = _joined(call, "sitting.tar.gz"), _joined(call, "compile-cache.tar")
    if not archive:
        raise NotImportable(f"{call}: no sitting.tar.gz.* (what a device call sends back)")
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if member.isfile() and name.parts[0] == "results" and name.suffix == ".jsonl":
                    for line in tar.extractfile(member).read().decode().splitlines():
                        if line.strip():
                            json.loads(line)
        if cache:
            with tarfile.open(fileobj=io.BytesIO(cache), mode="r:") as tar:
                tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise NotImportable(f"{call}: its archive does not read whole ({e}): a part missing?")
    return archive, cache


def append_new_lines(src: Path, dest: Path) -> int:
    """Append the lines of src that dest does not hold yet; returns how many."""
    have = set(dest.read_text().splitlines()) if dest.exists() else set()
    new = []
    for line in src.read_text().splitlines():
        if line.strip() and line not in have:
            new.append(line)
            have.add(line)
    if new:
        with open(dest, "a") as f:
            f.write("".join(line + "\n" for line in new))
    return len(new)


def import_call(k: int, archive: bytes, cache: bytes, sitting: Path, repo: Path) -> list[str]:
    said, runs = [], set()
    call_dir = sitting / f"call{k}"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        staged = sitting.parent / f".{sitting.name}.call{k}.partial"
        shutil.rmtree(staged, ignore_errors=True)
        tar.extractall(staged, filter="data")
    try:
        for path in sorted(staged.rglob("*")):
            rel = path.relative_to(staged)
            if path.is_dir():
                continue
            if rel.parts[0] == "results" and path.suffix == ".jsonl":
                n = append_new_lines(path, repo / "benchmarks" / "results" / rel.name)
                said.append(f"{rel.name}: {n} new record(s)")
            elif rel.parts[0] == "methods":
                if path.name in ("metrics.jsonl", "summary.json"):  # methods/<method>/...
                    runs.add(rel.parts[1])
                dest = repo / "runs" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                if path.name in RUN_FILES or path.suffix == ".png":
                    (call_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, call_dir / rel)
            else:
                (call_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, call_dir / rel)
                if rel.parts[0] == "autotune":
                    (repo / ".autotune").mkdir(exist_ok=True)
                    shutil.copy2(path, repo / ".autotune" / rel.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if cache:
        dest = repo / ".compile-cache"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        with tarfile.open(fileobj=io.BytesIO(cache), mode="r:") as tar:
            tar.extractall(dest, filter="data")
        said.append(f"compile cache -> {dest}")
    if runs:
        said.append(f"runs: {', '.join(sorted(runs))} -> {repo / 'runs' / 'methods'}")
    return said


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="import_sitting.py", description=__doc__.split("\n\n")[0])
    p.add_argument("calls", nargs="+", type=Path, metavar="CALL_DIR")
    p.add_argument("--name", required=True,
                   help="the sitting's folder under benchmarks/results/sittings, e.g. "
                        "2026-11-28-h200-fifth")
    p.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)  # tests
    args = p.parse_args(argv)
    sitting = args.repo / "benchmarks" / "results" / "sittings" / args.name
    try:
        if "/" in args.name or args.name in ("", ".", ".."):
            raise NotImportable(f"--name {args.name!r}: a folder name, not a path")
        if sitting.exists():
            raise NotImportable(f"{sitting} exists already: choose another --name")
        archives = [read_call(call) for call in args.calls]
    except NotImportable as e:
        print(f"import_sitting: {e}", file=sys.stderr)
        return 2
    sitting.mkdir(parents=True)
    for k, (archive, cache) in enumerate(archives, 1):
        for line in import_call(k, archive, cache, sitting, args.repo):
            print(f"call {k}: {line}")
    print(f"logs -> {sitting} (add a README.txt saying what each call ran, then commit it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
