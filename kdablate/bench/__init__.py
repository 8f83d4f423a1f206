"""The benchmark suite (``make bench``, ``python -m kdablate.bench``) and the GPU check
(``make gpu-check``, ``python -m kdablate.bench.gpu``). Nothing in the product imports it."""
