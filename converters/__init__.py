"""Readers of foreign checkpoint formats that write Flax checkpoints."""

import sys


def run_command(body, debug: bool = False) -> int:
    """Run a command's ``body()``: its return code, or one line ``error: ...`` and
    exit code 2 for any failure (130 for Ctrl-C); ``debug`` re-raises instead, with
    the traceback. Shared by the ``any4`` command and the converters."""
    try:
        return body()
    except KeyboardInterrupt as e:
        if debug:
            raise
        notes = "; ".join(getattr(e, "__notes__", []))  # e.g. what a resumable write kept
        print(f"error: interrupted; {notes or 'nothing was written'}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line
        if debug:
            raise
        plain = isinstance(e, (ValueError, OSError, KeyError)) and not isinstance(e, UnicodeDecodeError)
        message = (e.args[0] if isinstance(e, KeyError) and e.args else str(e)) or type(e).__name__
        message = "; ".join([message, *getattr(e, "__notes__", [])])
        print(f"error: {message if plain else f'{type(e).__name__}: {message} (rerun with --debug for the traceback)'}",
              file=sys.stderr)
        return 2
