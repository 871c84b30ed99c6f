"""`python -m nas.study --worker SPEC_JSON`: a worker process, started by `repnas search --workers N`."""

import sys

from nas.study.workers import worker_main

if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(worker_main(sys.argv[2]))
sys.exit("usage: python -m nas.study --worker SPEC_JSON (started by `repnas search --workers N`)")
