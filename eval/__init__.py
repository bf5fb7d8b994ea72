"""After training: generation (generate), lm-eval benchmarks (harness), routing analysis (analyze), and the
comparison of a sweep's runs (compare, report/)."""
