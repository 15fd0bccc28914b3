"""argparse types shared by the `serve` and `chat` commands (light: the client's CLI imports it)."""

import argparse
from collections.abc import Callable


def whole_number(minimum: int, maximum: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """An argparse type for an integer in [minimum, maximum] (no maximum: at least minimum); `what`, when
    given, names what the bounds are in the error ("must be between 0 and 9 (a digit; got 12)")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            got = f"{what}; got {value}" if what else f"got {value}"
            raise argparse.ArgumentTypeError(f"must be {allowed} ({got})")
        return value

    return parse
