"""`python bench_step.py ...` is ../shared/CONTRACT.md's name for the step benchmark and the memory plan, which live in
bench/step.py (`python bench/step.py --help`): this file hands its arguments on."""
from bench.step import main

if __name__ == "__main__":
    main()
