"""Coverage-guided fuzzing of the parsers (issue 10 item 8): targets, runner, seed corpus.

See tests/fuzz/README.md: `python -m tests.fuzz.run --target frames --seconds 30`.
"""
