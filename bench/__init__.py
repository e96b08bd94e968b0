"""Benchmarks of the recovery path: `epctl bench NAME [--quick] [--json]`.

Each benchmark lives in its own module (`bench.hook`, `bench.detect`,
`bench.resync`, `bench.stall`, `bench.fanout`) and exposes
`run(quick, log) -> BenchResult`; `bench.cli` maps names to modules, so a new
benchmark is one module and one entry there. `bench.report` (`make bench`)
runs them all and writes BENCHMARKS.md's generated sections.
A benchmark that compares against a baseline measures both in the same run,
so a ratio never mixes machines or moments.
"""
