"""``python -m ftengine`` is the ``ftengine`` command."""

from ftengine.cli import main

main()
