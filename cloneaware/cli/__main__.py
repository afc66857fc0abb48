"""``python -m cloneaware.cli`` (bench/scale.py, bench/reuse.py): the command
line, as ``python -m cloneaware`` runs it, less that one's answer to a signal
that comes during the imports."""
from cloneaware.cli import main

if __name__ == "__main__":
    main()
