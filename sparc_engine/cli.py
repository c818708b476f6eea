"""The ``sparc`` command: one typed function per subcommand (jsonargparse builds CLI and YAML schema).

Errors caused by input print one line (``error: ...``) and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def _commands() -> dict:
    from sparc_engine.attribute import attribute
    from sparc_engine.commands import evaluate, prune
    from sparc_engine.experiment import run

    return {"attribute": attribute, "prune": prune, "evaluate": evaluate, "run": run}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SPARC_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ["SPARC_DEBUG"] = "1"  # spawned ranks re-read it
    _quiet_libraries()
    return run_cli(_commands(), argv, debug=debug, hint="`sparc <command> --help`",
                   description="SparC³: find and prune the Llama neurons that drive an unwanted behaviour.")


def run_cli(components, argv: list[str] | None, debug: bool = False, hint: str = "--help", **kwargs) -> int:
    """jsonargparse ``CLI`` with this project's error contract: one ``error:`` line, exit code 2."""
    from jsonargparse import ArgumentError, ArgumentParser, CLI

    from sparc_engine.errors import SparcError

    try:
        CLI(components, args=argv, parser_class=ArgumentParser, exit_on_error=False, as_positional=False, **kwargs)
    except SparcError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ArgumentError as e:
        if debug:
            raise
        print("error: " + " ".join(str(e).split()) + f" — see {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
