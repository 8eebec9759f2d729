"""``python -m ftengine`` is the ``ftengine`` command."""

from ftengine.core.cli import main

main()
