"""One line of placements.jsonl from a profiled training run (gpu_sitting.sh's placements stage).

    python benchmarks/placement_record.py NAME RUN OUT [KEY=VALUE ...]

RUN is a finished `mpl-fast train --profile N` run under one data placement (the KEY=VALUEs are
the --set options it ran with, recorded as given); OUT is the JSON-lines file the record is
appended to. The record holds the profiled window's wall ms a step and images/s (steady state:
no compilation, no evaluation in the window), its GPU (or CPU) time and host time a phase, and
the whole session's share of time waiting for data, with the card, torch and date of the run.
A run without a profile or a summary (the window never reached, the run failed) is refused with
a one-line message and nothing is appended.
"""
import json
import sys
from pathlib import Path


class NotProfiled(Exception):
    pass


def placement_record(name: str, run: Path, sets: list[str]) -> dict:
    run = Path(run)
    try:
        prof = json.loads((run / "profile" / "summary.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
    except FileNotFoundError as e:
        raise NotProfiled(f"{run} has no {Path(e.filename).relative_to(run)}: run it to the end "
                          f"with --profile N (and train.profile_from inside the run)") from None
    return {"placement": name, "sets": list(sets),
            "wall_ms_per_step": prof["wall_ms_per_step"],
            "images_per_second": prof["images_per_second"],
            "ms_per_step": prof["ms_per_step"], "host_ms_per_step": prof["host_ms_per_step"],
            "profiled_steps": prof["steps"], "graphed": prof["graphed"],
            "data_wait_share": summary.get("data_wait_share"),
            "gpu": prof["device"], "torch": summary["torch"], "date": summary["date"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    name, run, out, *sets = argv
    from mpl_fast.train.run_log import append_jsonl

    try:
        record = placement_record(name, Path(run), sets)
    except NotProfiled as e:
        print(f"placement_record: {e}", file=sys.stderr)
        return 1
    append_jsonl(out, [record])
    print(f"{name}: {record['wall_ms_per_step']} ms a step, "
          f"{record['images_per_second']} images/s, data wait {record['data_wait_share']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
