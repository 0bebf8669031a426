"""`python -m worker`: run one worker process (started by the supervisor or `redwire echo`)."""

from worker.main import main

raise SystemExit(main())
