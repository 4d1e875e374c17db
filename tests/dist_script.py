"""Run an experiment script as one rank of torchrun, watching what the ranks other than 0 write
(tests/test_distributed_scripts.py):

    torchrun --nproc_per_node=2 tests/dist_script.py SCRIPT --out DIR ARGS...

On every rank but 0 an audit hook (sys.addaudithook) reports on stderr, as "rank R wrote ...", every write
under DIR: a file opened for writing, renamed, removed, truncated or touched, a folder made or removed.
Every file the code base writes goes through common.infra.outputs.atomic_write (os.open + os.replace, both
audited), so a write by another rank cannot pass unseen."""
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRITES = ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.utime", "os.chmod", "os.link",
          "os.symlink", "shutil.copyfile", "shutil.rmtree")


def watch(folder) -> None:
    root = os.path.realpath(folder)

    def inside(path) -> bool:
        try:
            real = os.path.realpath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return False
        return real == root or real.startswith(root + os.sep)

    def hook(event, args):
        try:
            if event == "open":
                path, mode, flags = args
                writes = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR
                                                                                  | os.O_CREAT | os.O_TRUNC))
                paths = [path] if writes else []
            elif event in WRITES:
                paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            else:
                return
            for p in paths:
                if inside(p):
                    os.write(2, f"rank {os.environ.get('RANK')} wrote ({event}) {os.fsdecode(p)}\n".encode())
        except Exception as err:  # noqa: BLE001 (a hook must never break the script)
            os.write(2, f"audit hook error: {err!r}\n".encode())

    sys.addaudithook(hook)


def main(script, args):
    out = args[args.index("--out") + 1]
    if os.environ.get("RANK", "0") != "0":
        watch(out)
    sys.path.insert(0, str(ROOT))
    sys.argv = [script] + args
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
