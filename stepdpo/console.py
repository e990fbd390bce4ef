"""A quiet terminal for long multi-stage commands (`stepdpo demo`, `stepdpo loop`): one line per stage with its
time, one progress bar at a time, the results; everything else (each stage's own lines, library logs and
warnings, tracebacks of what a stage caught) goes to a log file in the output directory.

The log gets the process's file descriptors 1 and 2 while a `Console` is open, so output that bypasses
`sys.stdout` (C extensions, loggers that kept the original stream) lands there too. Progress bars made with
`progress_bar` draw on the terminal, one at a time: each is removed when it closes. Results are written with
`Console.result` to standard output, and stage lines with their times to standard error, so standard output
holds only the results: the same command gives the same bytes there on every run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings

from tqdm import tqdm

_ACTIVE: "Console | None" = None


def progress_bar(*, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar: on the open Console's terminal (removed when done, so bars never pile up), else on stderr."""
    if _ACTIVE is not None:
        return tqdm(file=_ACTIVE.err, leave=False, disable=disable or not _ACTIVE.progress, dynamic_ncols=True,
                    **kwargs)
    return tqdm(disable=disable, **kwargs)


class Console:
    def __init__(self, log_path, name: str, progress: bool = True):
        self.log_path, self.name, self.progress = str(log_path), name, progress
        self.out = self.err = None

    def __enter__(self) -> "Console":
        global _ACTIVE
        if _ACTIVE is not None:  # nested (a loop inside a demo): the outer console keeps the terminal
            self._nested = True
            return _ACTIVE
        self._nested = False
        sys.stdout.flush()
        sys.stderr.flush()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._saved = (os.dup(1), os.dup(2))
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        self._log = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        # Python-level warnings and log records are written once each, to the log, with their origin
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("default")
        logging.captureWarnings(True)
        _ACTIVE = self
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        if self._nested:
            return False
        if exc[0] is not None:  # the traceback goes to the log; the terminal gets where to read it
            import traceback

            traceback.print_exception(*exc, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.captureWarnings(False)
        self._warnings.__exit__(None, None, None)
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        _ACTIVE = None
        if exc[0] is not None:
            self.err.write(f"[{self.name}] stopped; the full log: {self.log_path}\n")
        for f in (self.out, self.err, self._log):
            f.close()
        return False

    @contextlib.contextmanager
    def stage(self, name: str, times: dict):
        """Time a stage into `times[name]` and say when it ends: `[loop] sft  53.1 s`."""
        print(f"\n===== {self.name}: {name}", flush=True)  # a header in the log
        start = time.perf_counter()
        yield
        times[name] = round(time.perf_counter() - start, 2)
        self.err.write(f"[{self.name}] {name:<28s} {times[name]:8.1f} s\n")
        self.err.flush()

    def result(self, text: str = "") -> None:
        """A line of the results: on standard output (and in the log)."""
        self.out.write(text + "\n")
        self.out.flush()
        print(text, flush=True)

    def note(self, text: str) -> None:
        """A line for the terminal that is not a result (times, where the files are): standard error."""
        self.err.write(text + "\n")
        self.err.flush()
        print(text, flush=True)


def quiet_libraries() -> None:
    """Progress bars that libraries draw for themselves (loading weights, mapping datasets) would interleave with
    ours on the terminal; inside a Console they are switched off (our own bars say what is happening)."""
    with contextlib.suppress(Exception):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()
    with contextlib.suppress(Exception):
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()


def share_cores() -> None:
    """OpenMP threads that wait sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), unless the user chose a policy.
    Called by the CLI before torch starts. torch's libgomp spins waiting threads for a while by default; when more
    threads than cores are busy (two stages or ranks on one machine, a vLLM server beside a training run, a loaded CI
    machine) a spinning thread holds the core its partner needs. Three processes of 2 threads on 2 cores: a small
    matmul loop took 17-41 s each spinning, 3-4 s passive (about one process's time alone). The thread count, and so
    every number, is unchanged. pytorch/pytorch#57715, #19163."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def reproducible_cpu() -> None:
    """Pin the CPU code paths whose rounding differs between machines, before torch starts: ATen's vectorized
    kernels and MKL's BLAS take their AVX2 paths on every x86 CPU that has AVX2 (an AVX-512 machine would otherwise
    add some sums in another order, and a demo's sampled numbers would move). A value the user set is kept. Called
    by the CLI for `demo` and `loop`, whose printed numbers the README quotes."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            avx2 = " avx2" in f.read()
    except OSError:
        return
    if avx2:
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        os.environ.setdefault("MKL_CBWR", "AVX2")
