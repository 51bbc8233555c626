"""`python -m service …` is the `datasetd` command-line tool."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        # `make run`, the container: straight to the server, without the CLI's imports (the
        # client library, rich), which a supervisor of worker processes would carry for
        # nothing.
        from service.supervisor import main as serve

        sys.exit(serve())
    from service.cli.main import main

    sys.exit(main())
