"""k-NN evaluator against an independent brute-force NumPy implementation (8 simulated devices)."""
import jax
import numpy as np
import pytest

from swin_ssl.evaluators import common, datasets, knn


def numpy_knn(bank, bank_y, queries, k, temperature, num_classes, top=5):
    """Brute force, float64: cosine sims, the k most similar (lower bank index first among equal sims),
    weights exp(sim/T) summed per class, classes ranked by score (lower class id first among equal scores)."""
    bank = np.asarray(bank, np.float64)
    queries = np.asarray(queries, np.float64)
    bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    k = min(k, len(bank))
    out = []
    for q in queries:
        sims = bank @ q
        nearest = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for j in nearest:
            scores[bank_y[j]] += np.exp(sims[j] / temperature)
        out.append(np.argsort(-scores, kind="stable")[:min(top, num_classes)])
    return np.array(out)


def test_vote_matches_bruteforce_on_random_data():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(203, 12)).astype(np.float32)
    bank_y = rng.integers(0, 7, 203)
    queries = rng.normal(size=(57, 12)).astype(np.float32)
    ks = (1, 5, 10, 20, 100, 200, 500)  # 500 > bank: clamped to 203
    preds = knn.knn_predict(knn.FeatureBank(bank, bank_y), queries, num_classes=7, ks=ks, query_chunk=16)
    for k in ks:
        np.testing.assert_array_equal(preds[k], numpy_knn(bank, bank_y, queries, k, 0.07, 7), err_msg=f"k={k}")


def test_bank_smaller_than_devices_times_k():
    """13 rows on 8 devices: 2 rows per device, fewer than k, so the global top-k merges every device's rows."""
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(13, 5)).astype(np.float32)
    bank_y = rng.integers(0, 3, 13)
    queries = rng.normal(size=(9, 5)).astype(np.float32)
    preds = knn.knn_predict(knn.FeatureBank(bank, bank_y), queries, num_classes=3, ks=(3, 10, 20), query_chunk=4)
    for k in (3, 10, 20):
        np.testing.assert_array_equal(preds[k], numpy_knn(bank, bank_y, queries, k, 0.07, 3))


def test_ties_resolved_like_bruteforce():
    """One-hot features make similarities exactly equal (0, 1 or 1/sqrt(2)), so k cuts through ties."""
    rng = np.random.default_rng(2)
    dims = 4
    bank = np.eye(dims, dtype=np.float32)[rng.integers(0, dims, 40)]
    bank_y = rng.integers(0, 5, 40)
    queries = np.concatenate([np.eye(dims, dtype=np.float32), np.array([[1, 1, 0, 0], [0, 1, 0, 1]], np.float32)])
    ks = (1, 2, 3, 7, 10, 15, 25)
    preds = knn.knn_predict(knn.FeatureBank(bank, bank_y), queries, num_classes=5, ks=ks, query_chunk=8)
    for k in ks:
        np.testing.assert_array_equal(preds[k], numpy_knn(bank, bank_y, queries, k, 0.07, 5), err_msg=f"k={k}")
    # By hand: query e0 with k=1 takes the first bank row equal to e0.
    first = int(np.flatnonzero(bank[:, 0] == 1)[0])
    assert preds[1][0, 0] == bank_y[first]


def test_class_score_tie_goes_to_lower_class():
    bank = np.array([[1, 0], [1, 0]], np.float32)  # identical neighbours, labels 3 and 1: equal scores
    preds = knn.knn_predict(knn.FeatureBank(bank, np.array([3, 1])), np.array([[1, 0]], np.float32),
                            num_classes=4, ks=(2,), query_chunk=8)
    assert list(preds[2][0, :2]) == [1, 3]


@pytest.mark.parametrize("temperature, expected", [(0.07, 0), (1.0, 1)])
def test_temperature_weighting(temperature, expected):
    """One close neighbour of class 0 against two farther ones of class 1: the sharp T=0.07 weighting lets the
    close one win (exp(0.99/T) > 2 exp(0.8/T)), the flat T=1 one lets the majority win."""
    angle = lambda s: [s, np.sqrt(1 - s * s)]  # noqa: E731  unit vectors with cosine s to the query [1, 0]
    bank = np.array([angle(0.99), angle(0.8), angle(0.8), [-1.0, 0.0]], np.float32)
    bank_y = np.array([0, 1, 1, 2])
    q = np.array([[1.0, 0.0]], np.float32)
    preds = knn.knn_predict(knn.FeatureBank(bank, bank_y), q, num_classes=3, ks=(3,), temperature=temperature)
    assert preds[3][0, 0] == expected
    np.testing.assert_array_equal(preds[3], numpy_knn(bank, bank_y, q, 3, temperature, 3))


def test_masked_bank_rows_and_queries():
    """Padding rows that equal the queries but carry a wrong label must never vote; masked queries don't count."""
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(30, 6)).astype(np.float32)
    bank_y = rng.integers(0, 4, 30)
    queries = rng.normal(size=(11, 6)).astype(np.float32)
    query_y = rng.integers(0, 4, 11)
    expected = numpy_knn(bank, bank_y, queries, 20, 0.07, 4)
    # Append poisoned padding: copies of the queries with a label no query has.
    padded_bank = np.concatenate([bank, queries * 3.0])
    padded_y = np.concatenate([bank_y, np.full(11, 4)])
    bank_mask = np.arange(41) < 30
    padded_q = np.concatenate([queries, rng.normal(size=(5, 6)).astype(np.float32)])
    padded_qy = np.concatenate([query_y, np.full(5, 4)])
    query_mask = np.arange(16) < 11
    metrics = knn.knn_classify(padded_bank, padded_y, padded_q, padded_qy, num_classes=5, ks=(20, 100),
                               bank_mask=bank_mask, query_mask=query_mask, query_chunk=4)
    assert metrics["knn/num_queries"] == 11
    assert metrics["knn/top1_k20"] == pytest.approx(100 * np.mean(expected[:, 0] == query_y))
    # k=100 is clamped to the 30 real rows: all of them vote, none of the 11 padding rows.
    expected_all = numpy_knn(bank, bank_y, queries, 30, 0.07, 4)
    assert metrics["knn/top1_k100"] == pytest.approx(100 * np.mean(expected_all[:, 0] == query_y))
    top5 = np.mean([(query_y[i] in expected_all[i]) for i in range(11)])
    assert metrics["knn/top5_k100"] == pytest.approx(100 * top5)


def test_extraction_covers_every_example_exactly_once():
    """37 examples, batch 16 on 8 devices: 3 batches, 11 padding rows; each example comes back once, in order."""
    n = 37
    images = np.arange(n * 2 * 2, dtype=np.float32).reshape(n, 2, 2, 1)
    labels = np.arange(n, dtype=np.int32) % 5
    extractor = common.FeatureExtractor(common.make_feature_fn(None, "raw_pixels", denormalize_pixels=False))
    batches = list(common.padded_batches({"image": images, "label": labels}, 16))
    assert len(batches) == 3 and batches[-1]["mask"].sum() == n - 32
    feats, ys = extractor(None, batches)
    np.testing.assert_array_equal(feats, images.reshape(n, -1))
    np.testing.assert_array_equal(ys, labels)


HARD = dict(num_classes=3, synthetic_noise=40.0)


def test_in_training_knn_on_swin_matches_bruteforce():
    """The trainer's hook end to end with a random-init swin_test: batched, padded (24 and 10 examples in
    batches of 16), sharded extraction + k-NN equals NumPy k-NN on features of the whole sets from one call."""
    import ml_collections
    from swin_ssl.models import create_model

    train_config = ml_collections.ConfigDict(dict(
        model=dict(name="swin_test", overrides={}), data=dict(name="synthetic", image_size=32, data_dir="")))
    model = create_model("swin_test")
    online = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, np.zeros((1, 32, 32, 3), np.float32))["params"]
    params = {"online": online, "target": None, "default": online}
    metrics = knn.in_training_knn(train_config, params, step=2, ks=(1, 5, 20), train_examples=24,
                                  test_examples=10, batch_size=16, dataset=HARD)
    assert metrics["knn/num_queries"] == 10 and metrics["knn/bank_size"] == 24

    compiled = []  # the next evaluation (a copy of the config, as a resumed run has) compiles nothing

    def count(name, *_, **__):
        if name.endswith("backend_compile_duration"):
            compiled.append(name)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        again = knn.in_training_knn(ml_collections.ConfigDict(train_config.to_dict()), params, step=4,
                                    ks=(1, 5, 20), train_examples=24, test_examples=10, batch_size=16, dataset=HARD)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiled == [] and {k: v for k, v in again.items() if "top" in k} == {
        k: v for k, v in metrics.items() if "top" in k}

    data_cfg = knn.eval_dataset_for(train_config, 24, 10, HARD)
    train_x, train_y = datasets.arrays(data_cfg, "train")
    test_x, test_y = datasets.arrays(data_cfg, "test")
    pooled = np.asarray(jax.jit(model.apply)({"params": online}, np.concatenate([train_x, test_x]))[1]["pooled"])
    assert 10 < metrics["knn/top1_k20"] < 100  # a non-trivial problem, or the comparison would prove little
    bank, queries = pooled[:len(train_x)], pooled[len(train_x):]
    for k in (1, 5, 20):
        ref = numpy_knn(bank, train_y, queries, k, 0.07, 3)
        assert metrics[f"knn/top1_k{k}"] == pytest.approx(100 * np.mean(ref[:, 0] == test_y)), k
        top5 = np.mean([test_y[i] in ref[i] for i in range(len(test_y))])
        assert metrics[f"knn/top5_k{k}"] == pytest.approx(100 * top5), k


@pytest.mark.slow
def test_raw_pixel_fashion_mnist_baseline():
    """Cosine k-NN on raw pixels, full 60k bank / 10k queries: the known
    baseline (85.8 % at k=1, 84.6 % at k=20), and at k=1 the same answer as
    a brute-force cosine nearest neighbour in NumPy (up to a few exact ties)."""
    try:
        train_x, train_y = datasets.fashion_mnist_raw("train")
        test_x, test_y = datasets.fashion_mnist_raw("test")
    except (ValueError, FileNotFoundError) as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    bank = train_x.reshape(len(train_x), -1).astype(np.float32)
    queries = test_x.reshape(len(test_x), -1).astype(np.float32)
    metrics = knn.knn_classify(bank, train_y, queries, test_y, num_classes=10, ks=(1, 20), query_chunk=1000)
    assert metrics["knn/top1_k1"] == pytest.approx(85.8, abs=0.3)
    assert metrics["knn/top1_k20"] == pytest.approx(84.6, abs=0.3)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    nearest = np.concatenate([np.argmax(queries[i:i + 500] @ bank.T, axis=1) for i in range(0, len(queries), 500)])
    assert metrics["knn/top1_k1"] == pytest.approx(100 * np.mean(train_y[nearest] == test_y), abs=0.05)
