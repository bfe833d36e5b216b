"""A command's entry point, shared by every stage module (``python -m mlsys.<stage>``) and
the user CLI (``python -m mlsys <command>``): the common options, the parameter file, and
errors turned into one line and an exit code.

Bad input ends with one line on stderr and exit status 2; ``--debug`` (or MLSYS_DEBUG=1)
shows the traceback. SIGTERM ends a stage with status 143 and Ctrl-C with 130, its MLflow
run KILLED; a failed or unreachable torchrun peer with status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn

from .params import InputError, Params, load_params

SEED_HELP = "training seed (default: the first of `seeds` in params.yaml)"
SHARD_HELP = ("compute only shard i of n (chunks j with j mod n == i) and keep them for the merge: "
              "a later run without --shard merges every shard into the same output as one process")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every command takes (--params, --debug)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return ap


def seed_of(args: argparse.Namespace, p: Params) -> int:
    """``--seed``, or the first of ``seeds`` when it is not given."""
    return p.seeds[0] if args.seed is None else args.seed


def main(name: str, module: str, ap: argparse.ArgumentParser,
         body: Callable[[argparse.Namespace, Params], None], argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), read the parameter file and run
    ``body(args, params)``; returns the exit status. ``args.relaunch`` holds the
    interpreter arguments that re-run this command (``-m <module> ...``, what torchrun
    starts in each process, mlsys.distributed.launch). ``name`` prefixes error lines."""
    args = ap.parse_args(argv)
    args.relaunch = ["-m", module, *(sys.argv[1:] if argv is None else argv)]
    return guarded(name, args.debug, lambda: body(args, load_params(args.params)))


def finish(code: int) -> NoReturn:
    """End a stage process (``python -m mlsys.<stage>``) with exit status ``code`` without the
    interpreter's teardown: the final garbage collection and the module teardown of torch,
    MLflow and SQLAlchemy take ~2 s per process (measured: 7.9 s against 5.8 s for a process
    that imports them and logs a run), minutes over the default's stages. A stage has
    nothing left for it: ``main`` has returned, so its MLflow run is ended, its files are
    written, closed and renamed into place, and a torchrun group is destroyed; logging and the
    standard streams are flushed here. An exception still leaves the normal way, with its
    traceback."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def guarded(name: str, debug: bool, work: Callable[[], None]) -> int:
    """Run ``work()``; known failures become one line on stderr and an exit status."""
    debug = debug or os.environ.get("MLSYS_DEBUG") == "1"
    try:
        work()
    except (InputError, ConnectionError) as err:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the stage's run is already ended KILLED
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        dist = sys.modules.get("torch.distributed")
        if dist is None or not isinstance(err, dist.DistError):
            raise
        if debug:
            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{name}: error: another process of this torchrun job failed or is unreachable "
              f"({first[:200]})", file=sys.stderr)
        return 1
    except BaseException as err:
        tracking = sys.modules.get("mlsys.tracking")
        if tracking is None or not isinstance(err, tracking.StageKilled):
            raise
        print(f"{name}: {err}; stopped", file=sys.stderr)  # SIGTERM, run ended KILLED
        return 143
    return 0
