"""``config.evals.fn`` hooks the reliability tests inject into real ``train.py`` subprocesses.

The in-training evaluation hook is called after the step's checkpoint save, so it is a deterministic place to
kill a real process (``SIGKILL`` at step ``$SWIN_SSL_KILL_AT``) or to tell the test that training is under way.
"""
import os
import signal


def sigkill_at(*, config, params, step, workdir):
    if step == int(os.environ["SWIN_SSL_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return {}


def mark_alive(*, config, params, step, workdir):
    with open(os.path.join(workdir, "alive"), "w") as f:
        f.write(str(step))
    return {}
