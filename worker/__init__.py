"""One worker process's asyncio shell around the Sans-I/O core in `broker`.

Connections (`worker.protocol`), per-client sessions, the local topic hub, HTTP endpoints,
signals and draining. `python -m worker` is the entry point the supervisor starts.
"""
