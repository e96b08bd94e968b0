"""Benchmarks of the recovery path: `epctl bench NAME [--quick] [--json]`.

Each benchmark lives in its own module (`bench.hook`, `bench.detect`,
`bench.resync`) and exposes `run(quick, log) -> BenchResult`; `bench.cli`
maps names to modules, so a new benchmark is one module and one entry there.
A benchmark that compares against a baseline measures both in the same run,
so a ratio never mixes machines or moments.
"""
