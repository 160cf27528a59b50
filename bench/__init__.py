"""fleetcmd benchmark suite: ``.venv/bin/python bench/run.py [--quick]`` (see BENCHMARKS.md)."""
