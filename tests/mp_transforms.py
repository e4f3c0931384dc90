"""Grain transforms for the tests' DataLoaders with worker processes.

Kept apart from the test modules: a worker process imports the module of each
transform it runs, and this one imports Grain and NumPy only.
"""

import os

import grain


class FailOn(grain.transforms.Map):
    """Fails on the example whose first input value is `value` while the file
    `flag` exists (a record that cannot be decoded, say)."""

    def __init__(self, value: float, flag: str):
        self.value, self.flag = float(value), flag

    def map(self, element):
        if float(element["image"][0]) == self.value and os.path.exists(self.flag):
            raise ValueError("cannot decode record 13: truncated file")
        return element
