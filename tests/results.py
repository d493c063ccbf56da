"""Result tables from run folders, read from their metrics.json alone: how sure is each number?

    python -m tests.results runs/                        # every run below runs/
    python -m tests.results runs/lenet runs/lenet2 ...   # these runs only

Runs that differ only in --seed, or in options that say how a run was carried out (device,
threads, folders, --compile, ...), form one row: per script and variant, the data, epochs and
seeds, the final test accuracy as mean ± sample standard deviation with its range over the seeds,
where the runs held out a --val-split the best validation accuracy and the test accuracy at that
epoch (chosen on validation, never on the test split), seconds per epoch, device and PyTorch
version. Rows of one script and variant that differ in other options name them (`--lr 0.2`). The
output is the markdown that README.md and docs/results.md show; a user who trains elsewhere (a
GPU, the full CIFAR-10) regenerates the same tables for their machine with it.
Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402

# Options that do not change what is trained, beyond the seed: runs differing in them are one row.
NOT_SHAPING = utils.HOW_OPTIONS | {"seed", "batch_sizes"}


def runs_below(paths: list[Path]) -> list[dict]:
    """The record of every training run in or below `paths` (a comparison's own metrics.json skipped)."""
    records = []
    for path in paths:
        for file in sorted(path.rglob("metrics.json")):  # the folder's own, and its variants' below it
            try:
                record = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and isinstance(record.get("epochs"), list) and record["epochs"]:
                records.append(record)  # a comparison's metrics.json holds its variants' records: read them below
    return records


def data_of(args: dict) -> str:
    data = args.get("dataset", "?")
    if args.get("data_dir") and Path(args["data_dir"]).name != "data":  # a subset of its own, such as cifar10-dev
        data += f" ({Path(args['data_dir']).name})"
    if args.get("limit"):
        data += f", first {args['limit']:,}"
    if args.get("val_split"):
        data += f", {args['val_split']:,} held out for validation"
    return data


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation (one value: just it)."""
    if len(values) == 1:
        return f"{values[0]:.2f} %"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} %"


def finished(record: dict) -> bool:
    return len(record["epochs"]) == record["args"].get("epochs") and not record.get("diverged")


def differing_options(groups: dict[tuple, list[dict]], script: str, variant: str, shaping: tuple) -> str:
    """The options in which this row's runs differ from another row of the same script and variant (those the
    data and epochs columns do not show), as they were given: ` --lr 0.2`; "" when no other row has them."""
    ours, shown = dict(shaping), {"dataset", "limit", "val_split", "epochs"}
    others = [dict(other) for (name, kind, other) in groups if (name, kind) == (script, variant) and other != shaping]
    return "".join(f" --{name.replace('_', '-')} {json.loads(value)}" for name, value in sorted(ours.items())
                   if name not in shown and any(other.get(name) != value for other in others))


def table(records: list[dict]) -> str:
    """The markdown table of the finished runs, and a line naming how many were left out."""
    groups: dict[tuple, list[dict]] = {}
    left_out = [record for record in records if not finished(record)]
    for record in (record for record in records if finished(record)):
        shaping = tuple(sorted((key, json.dumps(value)) for key, value in record["args"].items()
                               if key not in NOT_SHAPING))
        groups.setdefault((record["script"], record.get("variant") or "", shaping), []).append(record)
    rows = []
    for (script, variant, shaping), runs in groups.items():
        runs.sort(key=lambda record: record["args"].get("seed", 0))
        finals = [record["final_test_acc"] for record in runs if record.get("final_test_acc") is not None]
        held_out = [record for record in runs if "best_val_acc" in record]
        seconds = [statistics.mean(row["seconds"] for row in record["epochs"]) for record in runs]
        name = f"`{script}.py`" + (f" {variant}" if variant else "")
        name += differing_options(groups, script, variant, shaping)
        rows.append({
            "script": name,
            "data": data_of(runs[0]["args"]),
            "epochs": runs[0]["args"].get("epochs", len(runs[0]["epochs"])),
            "seeds": ", ".join(str(record["args"].get("seed", "?")) for record in runs),
            "final test accuracy": spread(finals) if finals else "-",
            "range": f"{min(finals):.2f} - {max(finals):.2f} %" if len(finals) > 1 else "-",
            "best validation accuracy (epoch)": "; ".join(
                f"{record['best_val_acc']:.2f} % ({record['best_val_epoch']})" for record in held_out) or "-",
            "test accuracy there": spread([record["test_acc_at_best_val"] for record in held_out]) if held_out
            else "-",
            "seconds per epoch": f"{statistics.mean(seconds):.1f}",
            "device": ", ".join(sorted({record.get("device", "?") for record in runs})),
            "PyTorch": ", ".join(sorted({record.get("torch", "?") for record in runs})),
        })
    text = utils.markdown_table(rows) if rows else "No finished training runs found.\n"
    if left_out:
        text += (f"\nLeft out: {len(left_out)} run(s) not finished or diverged ("
                 + ", ".join(f"{record['script']} seed {record['args'].get('seed')}" for record in left_out) + ").\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, or folders that hold them")
    args = parser.parse_args(argv)
    missing = [str(folder) for folder in args.folders if not folder.is_dir()]
    if missing:
        print(f"No such folder: {', '.join(missing)}.", file=sys.stderr)
        return 2
    print(table(runs_below(args.folders)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
