"""How long the everyday commands take, start to exit, and how fast a bad argument fails.

    python -m benchmarks.cli_bench [--repeats 5]

Runs each command as a user would (`recsys ...` in a fresh process) against the configured
stores (RECSYS_DATABASE_URL / RECSYS_REDIS_URL; embedded ones otherwise, which start and stop
with each command and so cost more), after one warm-up run, and reports the median and the
worst wall time. Targets (issue #15): the read commands well under a second on a warm machine
with configured servers; a bad argument or unreadable source under 3 s, one line on stderr.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks import cpu_model, save_result

READS = [
    ["recs", "1", "2", "3", "--json"],
    ["models", "list"],
    ["models", "list", "--json"],
    ["models", "history"],
    ["publish", "list"],
    ["publish", "history"],
]
BAD_INPUT = [
    ["run", "--as-of", "1998-03-02", "--source", "bogus:x"],
    ["run", "--as-of", "1998-03-02", "--source", "csv:/nonexistent/*.csv"],
    ["run", "--as-of", "1998-03-02", "--source", "movielens:/nonexistent"],
    ["run", "--as-of", "1998-03-04"],
]


def time_command(args: list[str], repeats: int) -> dict:
    """Median and worst wall seconds of `recsys ARGS` over `repeats` runs after one warm-up."""
    command = [shutil.which("recsys") or sys.executable, *([] if shutil.which("recsys") else ["-m", "cli.main"]), *args]
    subprocess.run(command, capture_output=True, check=False)
    seconds, last = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        last = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - started)
    stderr_lines = [line for line in last.stderr.splitlines() if not line[:4].isdigit()]  # log lines start with a date
    return {
        "command": "recsys " + " ".join(args),
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "exit_code": last.returncode,
        "stderr_error_lines": [line for line in stderr_lines if line.startswith("error:") or "usage" in line][:1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    stores = "configured" if os.environ.get("RECSYS_DATABASE_URL") else "embedded"
    rows = [time_command(command, args.repeats) | {"kind": "read"} for command in READS]
    rows += [time_command(command, args.repeats) | {"kind": "bad input"} for command in BAD_INPUT]
    table = "\n".join(
        ["| command | kind | median s | max s | exit | error line |", "|---|---|---|---|---|---|"]
        + [
            f"| `{r['command']}` | {r['kind']} | {r['median_s']:.2f} | {r['max_s']:.2f} | {r['exit_code']} "
            f"| {(r['stderr_error_lines'] or [''])[0][:80]} |"
            for r in rows
        ]
    )
    load = os.getloadavg()
    header = f"stores: {stores}; CPU: {cpu_model()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    print(header)
    print(table)
    save_result("cli", {"stores": stores, "load_average": load, "rows": rows}, header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
