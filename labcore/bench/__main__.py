"""``python -m labcore.bench layers|inference|training [options]``."""

import sys

from labcore.bench import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
