"""edgeslim's version, written here and nowhere else.

pyproject.toml reads it when the package is built (``[tool.setuptools.dynamic]``), so the wheel's
metadata says the same as ``edgeslim --version``, the device agent's status records, the
registered models' tags and requirements, the reports and the default container images.
tests/unit/test_version.py checks that every copy of the number agrees with this one.
"""

__version__ = "0.1.0"
