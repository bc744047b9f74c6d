"""The benchmarks and the memory planner: research tools above the method (nothing below imports them)."""
