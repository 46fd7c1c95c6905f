"""Writing a benchmark's Markdown report: the lines, the code measured and the command that produced them."""

import os
import shlex
import subprocess
import sys


def commit(path: str | None = None) -> str:
    """The git commit of the checkout holding `path` (default: this folder), marked when it has uncommitted
    changes; "?" outside git."""
    here = os.path.dirname(os.path.abspath(path or __file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)recipes/benchmarks/results"],  # results are what a run writes
                               cwd=here, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "?"
    except OSError:
        return "?"


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that runs `script` with `argv` (default the process's arguments), quoted so that it can be pasted,
    with OMP_NUM_THREADS and TRITON_INTERPRET in front when set."""
    env = "".join(f"{name}={os.environ[name]} " for name in ("OMP_NUM_THREADS", "TRITON_INTERPRET")
                  if name in os.environ)
    args = sys.argv[1:] if argv is None else argv
    return " ".join([f"{env}python recipes/benchmarks/{script}", shlex.join(args)]).rstrip()


def write_report(path: str, lines: list[str], script: str, argv: list[str] | None = None) -> None:
    """Write `lines`, the srm_hf code measured (its checkout's commit: it may be another checkout on PYTHONPATH) and
    the command line (`command_line`) to `path`, and print them."""
    import srm_hf

    command = command_line(script, argv)
    text = "\n".join([*lines, "", f"Command: `{command}`; srm_hf at commit {commit(srm_hf.__file__)}.", ""])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
