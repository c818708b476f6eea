"""Entry script for `fabric run`, which starts a Python file in every process, not a console script.

Every process runs the same `sparc` command line; `fabric run` has already started them and hands
Fabric its settings through the environment (LT_*), so the engine does not launch again.
"""

import sys

from sparc_engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
