"""The host side: the ``Client`` host code uses to run scripts, and the ``scriptpool`` CLI."""

__all__: list[str] = []
