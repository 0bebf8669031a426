"""`python -m broker`: the same as the `redwire` command."""

from broker.cli import main

raise SystemExit(main())
