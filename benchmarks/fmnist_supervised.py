r"""Supervised reference for the Fashion-MNIST benchmark: what the same ``swin_nano`` learns *with labels* from the
same images, augmentation, optimizer and number of steps as the self-supervised ``fmnist30`` run.

It answers "is the 90 % linear-probe goal reachable in this budget at all?": if the network trained with labels
for the same steps does not give features far above it, self-supervision will not either. A benchmark, not a
test: nothing asserts.

The run: ``create_model`` from the MoBY ``fmnist30`` preset (swin_nano, patch 4, no drop path) with a 10-way head;
on-device random-resized crops of the preset's scale range plus horizontal flips of the whole-image 32-px view;
the preset's optimizer (``optim.make_optimizer``: AdamW, lr, warm-up, cosine, clip); batch 64; cross-entropy.
Reported: test top-1 of the trained head, then k-NN and the EsViT-protocol linear probe on its frozen features
(the ``fmnist.py`` columns).

    XLA_FLAGS=--xla_force_host_platform_device_count=1 .venv/bin/python benchmarks/fmnist_supervised.py --steps 5500
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # before fmnist's 8-device default
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from fmnist import LINEAR_LRS, load_train_config  # noqa: E402  (the quality benchmark beside this file)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="fmnist30", help="configs/moby_swin_tiny.py preset to copy the recipe from")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--linear_epochs", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "fmnist_supervised.json"))
    args = parser.parse_args(argv)

    from swin_ssl import host_memory

    host_memory.keep_freed_memory_mapped()  # as train.py does, before JAX starts its backend
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from swin_ssl.evaluators import compare, datasets, linear
    from swin_ssl.models import create_model
    from swin_ssl.train import optim

    config = load_train_config("moby", None, args.preset)
    steps = int(args.steps or config.total_steps)
    size, batch = int(config.data.image_size), int(config.batch_size)
    model = create_model(config.model.name, num_classes=10, drop_path_rate=0.0, **dict(config.model.overrides))
    (train_images, train_y), (test_images, test_y) = (datasets.fashion_mnist_raw(split) for split in ("train", "test"))
    train_x, train_y = datasets.to_model_input(train_images, size), train_y.astype(np.int32)
    test_x, test_y = datasets.to_model_input(test_images, size), test_y.astype(np.int32)

    tx = optim.make_optimizer(config.optim, total_steps=steps, warmup_steps=int(config.warmup_steps),
                              global_batch=batch).tx  # the MoBY preset's AdamW, schedule, clip and decay mask
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)["params"]
    opt_state = tx.init(params)
    crop_scale = tuple(config.data.crop_scale)

    @jax.jit
    def step(params, opt_state, images, labels, rng):
        images = linear.random_resized_crop_flip(images, rng, crop_scale)

        def loss_fn(p):
            logits, _ = model.apply({"params": p}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0].argmax(-1))
    rng, order, t0 = np.random.default_rng(0), np.empty(0, np.int64), time.perf_counter()
    key = jax.random.PRNGKey(1)
    for i in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(train_y))])
        idx, order = order[:batch], order[batch:]
        params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx], jax.random.fold_in(key, i))
        if (i + 1) % 500 == 0:
            print(f"step {i + 1}: loss {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t0
    correct = sum(int((np.asarray(predict(params, test_x[s:s + 1000])) == test_y[s:s + 1000]).sum())
                  for s in range(0, len(test_y), 1000))
    row = {"method": f"supervised ({steps} steps)", "head top1": 100.0 * correct / len(test_y),
           "train s": train_seconds}

    backbone = create_model(config.model.name, drop_path_rate=0.0, **dict(config.model.overrides))
    backbone_params = {k: v for k, v in params.items() if k != "head"}
    fs = compare.backbone_set(row["method"], backbone, backbone_params, compare.fmnist_config(size))
    m = compare.knn_metrics(fs, ks=(1, 20))
    lm = compare.linear_metrics(fs, "esvit", epochs=args.linear_epochs, lrs=LINEAR_LRS["esvit"])
    row.update({"k-NN k=1": m["knn/top1_k1"], "k-NN k=20": m["knn/top1_k20"], "linear esvit": lm["linear_esvit/top1"]})
    print(compare.format_table([row]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"row": row, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
