"""The one exception type a user can cause; the CLI turns it into one line and exit code 2."""


class FedlvcError(Exception):
    """A user-facing error: bad input file, bad option, damaged or foreign bitstream."""
