"""Building blocks of task=bench, one job each: settings (the ``bench:`` node, checked), twins
(the candidates' configs), cases (one N: timed units, rows), stats (cache and pool figures over a
case), timing, memory, flops (DESIGN section 8's two counts), reference (the matmul roof),
cache_bench (the cache target) and report (bench.csv, the table, metrics, loggers).

Orchestration (config -> objects -> cases -> rows) lives in ``dilexp.tasks.bench``; nothing here
builds objects from a Hydra config or drives Lightning, so the pieces can be reused from
notebooks and tests.
"""
