"""forkdec benchmarks: `python -m forkdec.bench <area>` or `forkdec bench <area>`.

Each area prints a table, states the machine and the peers' versions, and writes
`bench/results/<area>.md` (plus a PNG plot where a curve says more).
"""
