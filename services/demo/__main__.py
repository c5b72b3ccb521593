"""The CPU demo: hybrid vs dense-only vs sparse-only on reversed-digit addition.

    python -m protege.services.demo [--smoke] [--steps N] [--help]     (same as `protege demo`)
"""

import sys

from protege.services.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
