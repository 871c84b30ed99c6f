"""`python -m nas.study --worker SPEC_JSON`: a worker process, started by `repnas search --workers N`."""

import json
import sys

from nas.study.storage import storage_failure
from nas.study.workers import worker_main

if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    try:
        code = worker_main(sys.argv[2])
    except Exception as err:  # its storage failed (a full disk, a lost database): one line, relayed by the coordinator
        failure = storage_failure(err, json.loads(sys.argv[2])["settings"].get("storage"))
        if failure is None:
            raise
        print(f"storage error: {' '.join(str(failure).split())}", flush=True)
        code = 2
    sys.exit(code)
sys.exit("usage: python -m nas.study --worker SPEC_JSON (started by `repnas search --workers N`)")
