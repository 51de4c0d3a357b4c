"""`python -m stalwart.api --openapi`: print the REST API's OpenAPI description (as docs/openapi.json holds it).

Regenerate the checked-in copy after changing the API:
    python -m stalwart.api --openapi > docs/openapi.json
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stalwart.api", description=__doc__.splitlines()[0])
    parser.add_argument("--openapi", action="store_true", help="print the OpenAPI description (JSON)")
    args = parser.parse_args(argv)
    if not args.openapi:
        parser.print_help()
        return 2
    from stalwart.api.app import openapi

    sys.stdout.write(json.dumps(openapi(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
