"""The Cloud Storage stand-in is real: each client the project uses on ``gs://`` paths writes objects that the
emulator holds (checked through the emulator's own API) and reads back what the emulator holds.

Clients: orbax (tensorstore for array data, etils.epath for directories), etils.epath (gcsfs), and TensorFlow's
own GCS filesystem (``tf.io.gfile``, clu's TensorBoard writer, TFDS shards) through the local TLS proxy.
"""
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests import gcs_emulator


@pytest.fixture
def in_gcs(gcs):
    """The emulator's settings applied to this process for one test."""
    with gcs.applied():
        yield gcs


@pytest.mark.slow
def test_orbax_checkpoint_manager_saves_and_restores(in_gcs):
    import orbax.checkpoint as ocp
    from etils import epath

    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.array(7, np.int32)}
    manager = ocp.CheckpointManager(epath.Path("gs://bucket/checks/orbax"),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=1))
    for step in (1, 2):
        manager.save(step, args=ocp.args.StandardSave({**tree, "step": np.array(step, np.int32)}))
    manager.wait_until_finished()
    assert manager.all_steps() == [2]  # max_to_keep deleted step 1 from the bucket
    names = in_gcs.objects("checks/orbax/")
    assert names and all(name.startswith("checks/orbax/2/") for name in names), names
    restored = manager.restore(2, args=ocp.args.StandardRestore(tree))
    manager.close()
    np.testing.assert_array_equal(restored["w"], tree["w"])
    assert int(restored["step"]) == 2


def test_epath_writes_objects_the_emulator_holds(in_gcs):
    from etils import epath

    path = epath.Path("gs://bucket/checks/epath/sub/note.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"a": 1}))
    assert in_gcs.read("checks/epath/sub/note.json") == b'{"a": 1}'
    assert [p.name for p in epath.Path("gs://bucket/checks/epath/sub").iterdir()] == ["note.json"]
    assert json.loads(path.read_text()) == {"a": 1}


def test_tensorflow_gfile_goes_through_the_proxy(in_gcs):
    import tensorflow as tf

    base = "gs://bucket/checks/gfile"
    tf.io.gfile.makedirs(f"{base}/d")
    with tf.io.gfile.GFile(f"{base}/d/a.txt", "w") as f:
        f.write("written by tf.io.gfile")
    assert in_gcs.read("checks/gfile/d/a.txt") == b"written by tf.io.gfile"
    tf.io.gfile.rename(f"{base}/d/a.txt", f"{base}/d/b.txt")
    assert "checks/gfile/d/b.txt" in in_gcs.objects("checks/gfile/")
    assert "checks/gfile/d/a.txt" not in in_gcs.objects("checks/gfile/")
    assert tf.io.gfile.listdir(f"{base}/d") == ["b.txt"]
    assert tf.io.gfile.glob(f"{base}/d/*.txt") == [f"{base}/d/b.txt"]
    with tf.io.gfile.GFile(f"{base}/d/b.txt") as f:
        assert f.read() == "written by tf.io.gfile"


def test_clu_writer_puts_tensorboard_events_in_the_bucket(in_gcs, tmp_path):
    import tensorflow as tf
    from clu import metric_writers

    writer = metric_writers.create_default_writer("gs://bucket/checks/tb", just_logging=False)
    writer.write_scalars(3, {"loss": 0.25})
    writer.flush()
    writer.close()
    events = [n for n in in_gcs.objects("checks/tb/") if n.split("/")[-1].startswith("events.out.tfevents.")]
    assert len(events) == 1, in_gcs.objects("checks/tb/")
    local = tmp_path / "events"  # the bytes the emulator holds, parsed as an event file
    local.write_bytes(in_gcs.read(events[0]))
    values = [(e.step, v.tag, float(tf.make_ndarray(v.tensor)))
              for e in tf.compat.v1.train.summary_iterator(str(local)) for v in e.summary.value]
    assert values == [(3, "loss", 0.25)]


TFDS_IN_THE_BUCKET = r"""
import numpy as np
import tensorflow_datasets as tfds


class GcsCheckTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"id": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(10):
            yield i, {"id": i}


builder = GcsCheckTiny(data_dir="gs://bucket/checks/tfds")
builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
print("IDS", sorted(int(x["id"]) for x in tfds.as_numpy(builder.as_dataset(split="train"))))
"""


@pytest.mark.slow
def test_tfds_prepares_and_reads_a_dataset_in_the_bucket(gcs):
    """TFRecord shards written and read by TensorFlow (through the proxy), metadata by etils.epath (gcsfs). In a
    process of its own, as in a real run: etils fixes its backend (gcsfs or TensorFlow) when a process first
    uses it, so an earlier test in this process could have chosen TensorFlow's."""
    run = subprocess.run([sys.executable, "-c", TFDS_IN_THE_BUCKET], env={**os.environ, **gcs.env}, text=True,
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    shards = [n for n in gcs.objects("checks/tfds/gcs_check_tiny/1.0.0/") if ".tfrecord-" in n]
    assert len(shards) == 1, gcs.objects("checks/tfds/")
    assert f"IDS {list(range(10))}" in run.stdout


def test_proxy_refuses_other_hosts(gcs):
    proxy = gcs.env["http_proxy"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open("http://example.com/", timeout=10)
    assert info.value.code == 403


def test_emulator_starts_and_stops_with_its_context(tmp_path):
    with gcs_emulator.GcsEmulator(tmp_path, bucket="other") as emulator:
        with socket.create_connection(("127.0.0.1", emulator.port), timeout=5):
            pass
        assert emulator.objects() == []
        processes = emulator._process, emulator._proxy
    assert all(p.poll() is not None for p in processes)  # the emulator and the proxy have exited
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", emulator.port), timeout=5).close()
