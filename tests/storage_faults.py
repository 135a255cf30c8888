"""Runs ``train.py`` with the checkpoint reads of one process failing (test infrastructure, not the library).

    python tests/storage_faults.py MODE PROCESS STEP -- <train.py flags>

MODE "transient": reading the arrays of checkpoint STEP on process PROCESS raises a stale-file-handle OSError (what
an NFS mount or a flaky network gives); "damaged": it raises the error a truncated array file gives. The other
processes read normally, as when one host of a pod sees a storage error the others do not.
"""
import errno
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    mode, bad_process, bad_step = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    assert sys.argv[4] == "--" and mode in ("transient", "damaged"), sys.argv
    import jax
    from swin_ssl import checkpoint

    read = checkpoint._read_arrays

    def failing_read(path, item=None):
        if jax.process_index() == bad_process and os.path.basename(str(path).rstrip("/")) == bad_step:
            if mode == "transient":
                raise OSError(errno.ESTALE, "Stale file handle", str(path))
            raise ValueError(f"DATA_LOSS: Error reading {path}/state: truncated file (injected)")
        return read(path, item)

    checkpoint._read_arrays = failing_read
    sys.argv = [os.path.join(ROOT, "train.py"), *sys.argv[5:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
