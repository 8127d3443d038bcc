"""One of two racing jobs (tests/jobs/test_concurrent_jobs.py): ``vitcnn`` commands on cue.

Usage: ``python -m tests.jobs.concurrent_job FOLDER NAME``. For each line
``TRIAL<TAB>ARGS...`` of ``FOLDER/trials.tsv`` it waits until ``FOLDER/go-TRIAL``
exists, runs ``vitcnn ARGS`` in this process (imports paid once for all
trials), and writes its exit code and stderr to ``FOLDER/TRIAL-NAME.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path


def main() -> None:
    folder, name = Path(sys.argv[1]), sys.argv[2]
    from vitcnn_store.cli import main as vitcnn

    (folder / f"ready-{name}").touch()
    for line in (folder / "trials.tsv").read_text().splitlines():
        trial, *args = line.split("\t")
        while not (folder / f"go-{trial}").exists():
            time.sleep(0.01)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = vitcnn(args)
            except BaseException as e:  # a crash is what the test looks for: report it
                code, err = 99, io.StringIO(f"Traceback: {type(e).__name__}: {e}")
        (folder / f"{trial}-{name}.json").write_text(
            json.dumps({"code": code, "stderr": err.getvalue()})
        )


if __name__ == "__main__":
    main()
