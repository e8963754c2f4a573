"""Suite-wide pytest hooks.

Tests never depend on their order or on each other's files (each writes under its own
`tmp_path`), so the suite may run in any order and in parallel (`bash run_tests.sh` uses
pytest-xdist when installed). This hook only changes the order: the modules that spend minutes
in real training and evaluation processes run first, so that with two workers the longest ones
start at once on both instead of one of them being left alone at the end.
"""
from __future__ import annotations

# By measured time (`--durations`), longest first; a name missing here only runs in its usual
# place, so a stale entry costs time, never correctness.
LONGEST_FIRST = ("test_resume.py", "test_paper_table.py", "test_tags_train.py", "test_cli.py",
                 "test_infer.py", "test_errors.py", "test_readme_commands.py", "test_speed.py",
                 "test_predict.py", "test_densecrf.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable within a module
