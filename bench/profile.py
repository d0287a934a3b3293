"""Profile one worker under one scenario: ``python -m bench.profile SCENARIO [BACKEND]``.

Starts the server like ``make bench`` (one worker), drives SCENARIO with wrk, records the
worker with py-spy (``pip install py-spy``) and prints the functions with the most samples,
inclusive and self. Used to decide what to optimise; the figures go in bench/notes.md.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from server.keys import KeyStore

from .run import CONNECTIONS, serving, wrk


def main() -> int:
    scenario = sys.argv[1]
    backend = sys.argv[2] if len(sys.argv) > 2 else "postgresql"
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        workdir = Path(tmp)
        keys = workdir / "keys"
        KeyStore(keys).ensure()
        with serving(backend, 1, workdir, keys) as (seeded, process):
            script, args = seeded.scenario_args(scenario)
            if script in ("refresh", "mixed"):
                seeded.fresh_chains(CONNECTIONS * 3)
            raw = workdir / "profile.txt"
            load = threading.Thread(
                target=lambda: print(wrk(seeded.url, script, args, 12, CONNECTIONS))
            )
            load.start()
            subprocess.run(
                [
                    "py-spy",
                    "record",
                    "-r",
                    "250",
                    "-d",
                    "8",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "-p",
                    str(process.pid),
                    "--nonblocking",
                ],
                check=True,
                capture_output=True,
            )
            load.join()
            summarise(raw.read_text())
    return 0


def summarise(text: str, top: int = 60) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"{total} samples")
    busy = total - sum(c for f, c in own.items() if "wait" in f.lower() or "select" in f)
    print(f"{busy} samples not waiting")
    print("-- inclusive (of samples not waiting)")
    for frame, count in inclusive.most_common(top):
        print(f"{count / busy:6.1%}  {frame}")
    print("-- self")
    for frame, count in own.most_common(top):
        print(f"{count / total:6.1%}  {frame}")


if __name__ == "__main__":
    sys.exit(main())
