"""The example scripts: C and WAT sources, their built modules and inputs.

Installed inside the tool as ``scriptpool.examples`` (package data), so the demo finds them
wherever scriptpool is installed.
"""
