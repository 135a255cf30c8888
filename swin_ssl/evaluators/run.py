"""``evaluate(config, workdir)``: the library behind ``evaluate.py`` (k-NN or linear probe of one backbone).

Config schema (``configs/knn.py``, ``configs/linear.py``):

    mode            "knn" | "linear"
    model.name      a ``create_model`` name ("" = the checkpoint's model: a training workdir's meta or a
                    swin_ssl.convert file's meta); model.norm_eps / window_size / img_size / drop_path_rate:
                    optional overrides (else the checkpoint's own)
    init            "checkpoint" (a training workdir) | "params_file" (e.g. converted official weights) | "random_init"
    checkpoint_dir, checkpoint_step, params_path
    network         "target" (EMA teacher; EsViT/DINO) | "online" (MoBY) | "default" (the checkpoint's objective decides)
    feature         "pooled" | "last_blocks" | "cls_avgpool" | "raw_pixels" (no network: the pixel baseline)
    n_last_blocks   for "last_blocks" (4: EsViT/DINO linear protocol)
    dataset.*       see ``swin_ssl.evaluators.datasets``; train_split / test_split
    batch_size      eval (feature-extraction) batch, a multiple of the device count
    knn.*           ks, temperature, query_chunk, precision
    linear.*        protocol hyper-parameters (``linear.protocol_defaults``), mode "augment" | "cached", lrs, ...
    seed

Writes ``workdir/results.json`` (metrics + what was evaluated) and the metrics as TensorBoard scalars.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from swin_ssl import config_rules as rules
from swin_ssl import storage
from swin_ssl.evaluators import common, datasets, knn, linear, loading
from swin_ssl.train.parallel import make_mesh

PyTree = Any
MODES = ("knn", "linear")
INITS = ("checkpoint", "params_file", "random_init")
NETWORKS = ("online", "target", "default")


def check(config: Any) -> None:
    """The rules of an evaluation config (one-line ``ValueError`` naming the key), checked before loading."""
    for key, allowed in (("mode", MODES), ("init", INITS), ("network", NETWORKS), ("feature", common.FEATURE_KINDS)):
        if config[key] not in allowed:
            rules.fail(key, config[key], f"must be one of {', '.join(allowed)}")
    rules.positive("batch_size", config.batch_size)
    rules.positive("dataset.image_size", config.dataset.image_size)
    if config.feature == "last_blocks":
        rules.positive("n_last_blocks", config.n_last_blocks)
    if config.mode == "knn":
        rules.positive("knn.temperature", config.knn.temperature)
        rules.positive("knn.query_chunk", config.knn.query_chunk)
        for k in config.knn.ks:
            rules.positive("knn.ks", k)
    else:
        for key in ("epochs", "batch_size", "base_lr"):
            rules.positive(f"linear.{key}", config.linear[key])
        for lr in config.linear.get("lrs") or ():
            rules.positive("linear.lrs", lr)


def build_model(config: Any, meta: dict | None = None):
    """The backbone to evaluate. For a training checkpoint the model is built as the trainer built it (name,
    ``model.overrides``, ``img_size`` = training image size, from the checkpoint's meta) unless the eval config
    names another model; ``model.norm_eps`` / ``window_size`` / ``img_size`` / ``drop_path_rate`` set in the eval
    config win. A model that does not fit the checkpoint is caught by the strict parameter check."""
    from swin_ssl.models import from_config

    meta = meta or {}
    train_cfg = meta.get("config") or {}
    name = model_name(config, meta)
    fields = {k: config.model[k] for k in ("norm_eps", "window_size", "img_size", "drop_path_rate")
              if config.model.get(k) is not None}
    if name != (train_cfg.get("model") or {}).get("name"):  # another model than the checkpoint's: its own preset
        return from_config({"name": name}, None, **fields)
    return from_config(train_cfg["model"], (train_cfg.get("data") or {}).get("image_size"), **fields)


def model_name(config: Any, meta: dict | None = None) -> str:
    meta = meta or {}
    name = config.model.name or ((meta.get("config") or {}).get("model") or {}).get("name") or meta.get("model")
    if not name:
        raise ValueError("config.model.name is empty: name the model (only a training checkpoint can supply it)")
    return name


def image_shape(config: Any) -> tuple[int, int, int]:
    size = int(config.dataset.image_size)
    return (size, size, 3)


def load(config: Any) -> tuple[Any, PyTree, dict]:
    """``(model, backbone params, info)``; info records what was loaded (for results.json)."""
    meta, tree = {}, None
    if config.init == "checkpoint":
        if not config.get("checkpoint_dir"):
            raise ValueError("init='checkpoint' needs --config.checkpoint_dir (a training workdir)")
        tree, meta = loading.restore_workdir(config.checkpoint_dir, config.get("checkpoint_step"))
    elif config.init == "params_file":
        if not config.get("params_path"):
            raise ValueError("init='params_file' needs --config.params_path")
        tree, meta = loading.split_file_meta(loading.load_params_file(config.params_path))
    network = config.network
    if network == "default":  # the objective's own choice: MoBY online, EsViT/DINO target
        network = meta.get("eval_backbone") or "target"
    model = build_model(config, meta)
    params = loading.load_backbone(
        model, image_shape(config), init=config.init, network=network, tree=tree,
        params_path=config.get("params_path", ""), seed=config.seed,
        what=(f"{network} network of the checkpoint in {config.get('checkpoint_dir')}" if config.init == "checkpoint"
              else f"{network} network of the params file {config.get('params_path')}"))
    info = dict(network=network if config.init != "random_init" else None, checkpoint_step=meta.get("step"),
                objective=meta.get("objective"), model=model_name(config, meta))
    return model, params, info


def _batches(config: Any, which: str):
    """Zero-argument factory of the padded eval batches of the "train" (bank) or "test" (query) split."""
    return lambda: datasets.eval_batches(config.dataset, which, int(config.batch_size))


def _shuffled_train_batches(config: Any, batch_size: int):
    """In-memory training batches in a fresh order each epoch (padded last batch), for the augmenting probe."""
    images, labels = datasets.arrays(config.dataset, "train")

    def batches(epoch: int):
        order = np.random.default_rng((config.seed, epoch)).permutation(len(labels))
        return common.padded_batches({"image": images[order], "label": labels[order]}, batch_size)

    return batches, len(labels)


def run_knn(config: Any, model: Any, params: PyTree, mesh) -> dict[str, float]:
    feature_fn = common.make_feature_fn(model, config.feature, n_last_blocks=config.n_last_blocks)
    k = config.knn
    evaluator = knn.KnnEvaluator(feature_fn, _batches(config, "train"), _batches(config, "test"),
                                 num_classes=datasets.num_classes(config.dataset), ks=tuple(k.ks),
                                 temperature=k.temperature, mesh=mesh, query_chunk=k.query_chunk,
                                 precision=k.precision)
    return evaluator(params)


def run_linear(config: Any, model: Any, params: PyTree, mesh) -> dict[str, float]:
    lc = config.linear.to_dict() if hasattr(config.linear, "to_dict") else dict(config.linear)
    num_classes = datasets.num_classes(config.dataset)
    lrs = list(lc.get("lrs") or []) or None
    eval_fn = common.make_feature_fn(model, config.feature, n_last_blocks=config.n_last_blocks, train=False)
    extractor = common.FeatureExtractor(eval_fn, mesh)
    t0 = time.perf_counter()
    test_x, test_y = extractor(params, _batches(config, "test")())
    metrics: dict[str, float] = {}
    if lc["mode"] == "cached" or config.feature == "raw_pixels":
        train_x, train_y = extractor(params, _batches(config, "train")())
        metrics["linear/extract_seconds"] = time.perf_counter() - t0
        metrics.update(linear.train_on_features(train_x, train_y, test_x, test_y, lc, num_classes=num_classes,
                                                lrs=lrs, mesh=mesh, seed=config.seed,
                                                eval_every_epochs=lc.get("eval_every_epochs", 1)))
    elif lc["mode"] == "augment":
        train_fn = common.make_feature_fn(model, config.feature, n_last_blocks=config.n_last_blocks,
                                          train=bool(lc.get("backbone_train", False)))
        if datasets.in_memory(config.dataset):  # crops + flips on the device, from the eval images
            batches, num_train = _shuffled_train_batches(config, int(lc["batch_size"]))
            on_device = True
        else:  # the data pipeline's RandomResizedCrop + flip of the full decoded images (faithful)
            batches, num_train = datasets.pipeline_train_batches(config.dataset, int(lc["batch_size"]), config.seed)
            on_device = False
        metrics.update(linear.train_augmented(train_fn, params, batches, test_x, test_y, lc,
                                              num_classes=num_classes, num_train=num_train, lrs=lrs, mesh=mesh,
                                              seed=config.seed, augment_on_device=on_device,
                                              eval_every_epochs=lc.get("eval_every_epochs", 1)))
    else:
        raise ValueError(f"linear.mode must be 'augment' or 'cached', got {lc['mode']!r}")
    metrics["linear/feature_dim"] = float(test_x.shape[1])
    return metrics


def describe(config: Any, info: dict) -> dict[str, Any]:
    """What was evaluated (goes into results.json next to the metrics)."""
    if config.feature == "raw_pixels":
        return dict(mode=config.mode, feature="raw_pixels", source="raw pixels", dataset=config.dataset.name,
                    devices=jax.device_count())
    source = {"random_init": "random initialisation", "params_file": config.get("params_path", ""),
              "checkpoint": config.get("checkpoint_dir", "")}.get(config.init, config.init)
    return dict(mode=config.mode, model=info.get("model"), init=config.init, source=source,
                feature=config.feature, dataset=config.dataset.name, devices=jax.device_count(),
                **{k: v for k, v in info.items() if k != "model"})


def evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Runs the configured evaluation, prints/logs the metrics, writes ``workdir/results.json`` + TensorBoard."""
    check(config)
    t0 = time.perf_counter()
    mesh = make_mesh()
    if config.feature == "raw_pixels":
        model, params, info = None, None, {}
    else:
        model, params, info = load(config)
    if config.mode == "knn":
        metrics = run_knn(config, model, params, mesh)
    elif config.mode == "linear":
        metrics = run_linear(config, model, params, mesh)
    else:
        raise ValueError(f"config.mode must be 'knn' or 'linear', got {config.mode!r}")
    metrics["total_seconds"] = time.perf_counter() - t0
    for name, value in sorted(metrics.items()):
        logging.info("%s = %.4f", name, value)
        print(f"{name}: {value:.4f}")
    write_results(workdir, metrics, describe(config, info), step=int(info.get("checkpoint_step") or 0))
    return metrics


def write_results(workdir: str, metrics: dict[str, float], info: dict[str, Any], step: int = 0) -> str:
    """``workdir/results.json`` (written atomically; ``workdir`` may be a URL) and TensorBoard scalars (clu metric
    writers) on process 0."""
    path = storage.join(workdir, "results.json")
    if jax.process_index() != 0:
        return path
    storage.atomic_write_text(path, json.dumps({"metrics": metrics, "evaluated": info}, indent=2, sort_keys=True))
    from clu import metric_writers
    writer = metric_writers.create_default_writer(storage.join(workdir), asynchronous=False)
    writer.write_scalars(step, {k: float(v) for k, v in metrics.items()})
    writer.flush()
    writer.close()
    return path
