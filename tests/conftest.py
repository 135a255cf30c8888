"""Test setup: 8 simulated CPU devices and a compilation cache, set before JAX is imported anywhere."""
import atexit
import os
import shutil
import tempfile

from tests.xla_env import xla_flags  # noqa: E402

# 8 simulated devices and compile-time flags (tests/xla_env.py says why), unless the caller chose a device count.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite is written for 8 simulated CPU devices, also on a machine that has a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile the same small programs again and again, here and in the train.py processes they start (which
# inherit this environment): a compilation cache for the session compiles each program once. A cached executable
# is the compiled one, so no number changes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="swin_ssl_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402

# The longest files (most of them start train.py processes), longest first: `make test` hands whole files to its
# workers in this order, so a long one does not start last and leave one worker alone at the end.
LONGEST_FILES = ("test_multihost.py", "test_reliability.py", "test_untrusted_input.py", "test_gcs_workdir.py",
                 "test_train_loop.py", "test_models.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def fmnist_stub_dir(tmp_path):
    """A directory holding the four Fashion-MNIST file names (empty): enough for config validation, which checks
    that the files are there, so the Fashion-MNIST presets validate whether or not the data set is installed."""
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).touch()
    return str(tmp_path)


from swin_ssl.config_files import configs_package  # noqa: E402

configs_package()  # the tests import the top-level configs (``from configs import knn``) like train.py does


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A Cloud Storage emulator with bucket ``gs://bucket`` (+ the TLS proxy for TensorFlow's client) on 127.0.0.1,
    started for the session and stopped after it: ``gcs.env`` for subprocesses, ``gcs.applied()`` for this one,
    ``gcs.objects(prefix)`` / ``gcs.read(name)`` to look into the bucket."""
    from tests import gcs_emulator

    with gcs_emulator.GcsEmulator(tmp_path_factory.mktemp("gcs_emulator")) as emulator:
        yield emulator
