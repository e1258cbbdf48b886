"""`tomllib` for every supported Python: the standard library's from 3.11, its backport `tomli` on 3.10 (a
dependency there, pyproject.toml). One import for the project's TOML readers (config.py, plan/hardware.py)."""

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

__all__ = ["tomllib"]
