"""hobbitd entry point. The daemon itself is issue #3; until it lands this says so."""
import sys


def main(argv=None) -> int:
    print("hobbitd: the loader daemon is not implemented yet (issue #3); "
          "use `hobbit-cli generate --no-daemon`", file=sys.stderr)
    return 2
