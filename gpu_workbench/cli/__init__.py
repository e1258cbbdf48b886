"""The `wb` command line: the only layer that knows all the others."""
