"""``python -m kdablate.bench``: the benchmark suite (see ``kdablate.bench.suite``)."""
from kdablate.bench.suite import main

raise SystemExit(main())
