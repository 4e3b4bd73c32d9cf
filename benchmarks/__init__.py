"""sweep's benchmark suites and the baselines they compare against (see README.md)."""
