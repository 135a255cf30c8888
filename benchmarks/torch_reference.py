r"""PyTorch reference train steps (timm's Swin-T inside MoBY- and EsViT-shaped steps written with plain torch),
run in a subprocess of a Python that has torch + timm, and timed in rounds that alternate with ours.

Used by ``throughput.py`` (timm's backbone alone), ``moby_step.py`` and ``esvit_step.py``. Run directly, it is the subprocess: it builds the step, answers
each ``run N`` line on stdin with the wall and CPU seconds of N steps as one JSON line, and exits at EOF.

The steps (same work as ours; fp32 on all cores, or on a CUDA GPU with ``device="cuda"``, where
``dtype="bfloat16"`` runs the forward passes and losses under ``torch.autocast`` in bf16 with fp32 parameters and
optimizer -- the official code's mixed precision is fp16 with loss scaling; fp32 matmuls there may use TF32, as
XLA's do by default):
  * ``moby``: online Swin-T (drop path 0.2) -> projector (768 -> 4096 -> BN -> ReLU -> 256) -> predictor
    (256 -> 4096 -> BN -> ReLU -> 256); target Swin-T + projector (no grad) whose parameters are EMA'd first;
    one call per view; contrastive loss of each view's prediction against the other view's key and a 4096-key
    queue at temperature 0.2 (sum of the two); backward; global-norm clip 5; AdamW (wd 0.05); enqueue.
  * ``esvit``: student Swin-T (drop path 0.1) on 2 global + N local crops (one call per resolution), teacher on
    the globals (EMA first, no grad); DINO heads (768 -> 2048 -> 2048 -> 256 -> weight-normed out_dim) on the
    pooled features (view level) and on every token (region level); view loss over all pairs of different crops
    with a centred, sharpened teacher; region loss against the best-matching teacher token; AdamW, clip 3.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

DEFAULT_PYTHON = os.environ.get("SWIN_SSL_TORCH_PYTHON", "/work/torchref/bin/python")


def timed(fn, iters: int) -> dict:
    """Wall and process-CPU seconds of ``iters`` calls of ``fn`` (CPU time is the steadier one when other jobs
    share the cores); the reference subprocess reports the same two lists."""
    walls, cpus = [], []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"walls": walls, "cpus": cpus}


class LiveWorker:
    """A benchmark subprocess kept alive between rounds: it prints one JSON line once built (``info``), then
    answers each ``run N`` line on stdin with the wall and CPU seconds of N steps (``serve_steps``)."""

    def __init__(self, name: str, cmd: list[str], **popen):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **popen)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve_steps(step, info: dict) -> None:
    """The subprocess side of ``LiveWorker``: announce ``info``, then time ``step`` for each ``run N`` line."""
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        print(json.dumps(timed(step, int(line.split()[1]))), flush=True)


class TorchReference(LiveWorker):
    """The reference step in a live subprocess, so rounds can alternate with ours without rebuilding it."""

    def __init__(self, python: str, kind: str, **setup):
        # Same CPUs as this process (a pinned run pins both sides), one torch thread per CPU.
        super().__init__("torch reference", [python, os.path.abspath(__file__), kind, json.dumps(setup)])
        # self.info: versions, after the model is built and one step ran


def reference_device(platform: str, dtype: str, model: str) -> str | None:
    """Where the PyTorch step runs beside ours ("cpu" / "cuda"), or None when there is nothing to compare:
    timm's Swin-T only, fp32 on the CPU (autocast bf16 on CPUs is no reference), any dtype on a CUDA GPU."""
    device = {"cpu": "cpu", "gpu": "cuda"}.get(platform)
    if model != "swin_tiny" or device is None or (device == "cpu" and dtype != "float32"):
        return None
    return device


def available(python: str) -> bool:
    """A path to an interpreter, or a name on PATH (``python3``)."""
    return bool(python) and (os.path.exists(python) or shutil.which(python) is not None)


def print_comparison(ours_name: str, walls: list[float], cpus: list[float], ref_name: str, ref: dict,
                     images_per_step: int, load_before: tuple, ref_peak_gib: float | None = None) -> None:
    """A two-row table of median images/s (wall) and the same-run ratios, wall and CPU time."""
    import statistics
    ours_wall, ref_wall = statistics.median(walls), statistics.median(ref["walls"])
    ours_cpu, ref_cpu = statistics.median(cpus), statistics.median(ref["cpus"])
    print(f"\nsame run, alternating rounds, medians of {len(walls)} / {len(ref['walls'])} steps; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"| implementation | img/s (wall) | s/step CPU time |\n|---|---|---|")
    print(f"| {ours_name} | {images_per_step / ours_wall:.3f} | {ours_cpu:.2f} |")
    print(f"| {ref_name} | {images_per_step / ref_wall:.3f} | {ref_cpu:.2f} |")
    print(f"| ratio ours / PyTorch | {ref_wall / ours_wall:.2f}x | {ref_cpu / ours_cpu:.2f}x |")
    if ref_peak_gib is not None:
        print(f"PyTorch peak device memory (torch.cuda.max_memory_allocated): {ref_peak_gib:.2f} GiB")


# ------------------------------------------------------------------------------------------------
# The subprocess side (imports torch/timm only here).

def _mlp(torch, dims: list[int], bn: bool):
    nn = torch.nn
    layers = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.BatchNorm1d(dims[i + 1])] if bn else [])
        layers += [nn.ReLU(inplace=True)] if bn else [nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1]))


def _swin(timm, drop_path: float):
    # Both flags: timm 1.0.29 checks the input size unless strict_img_size is off (1.0.31 implies it).
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                             drop_path_rate=drop_path, dynamic_img_size=True, strict_img_size=False)


def _ema(torch, target, online, m: float) -> None:
    with torch.no_grad():
        t, o = list(target.parameters()), list(online.parameters())
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, o, alpha=1 - m)


def moby_step_fn(torch, timm, amp, batch: int, size: int, queue: int = 4096, dim: int = 256):
    import copy
    F = torch.nn.functional
    encoder = _swin(timm, 0.2)
    projector = _mlp(torch, [768, 4096, dim], bn=True)
    predictor = _mlp(torch, [dim, 4096, dim], bn=True)
    target = torch.nn.Sequential(copy.deepcopy(encoder), copy.deepcopy(projector))
    for block in target[0].modules():  # target drop path 0
        if hasattr(block, "drop_prob"):
            block.drop_prob = 0.0
    target.requires_grad_(False)
    online = torch.nn.ModuleList([encoder, projector, predictor]).train()
    opt = torch.optim.AdamW(online.parameters(), lr=1e-3, weight_decay=0.05)
    queues = [F.normalize(torch.randn(queue, dim), dim=1) for _ in range(2)]
    views = [torch.randn(batch, 3, size, size) for _ in range(2)]
    ptr = [0]

    def contrastive(q, k, negatives):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.t()], 1) / 0.2
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    def step():
        _ema(torch, target, torch.nn.Sequential(encoder, projector), 0.99)
        with amp():
            qs = [F.normalize(predictor(projector(encoder(v))), dim=1) for v in views]
            with torch.no_grad():
                ks = [F.normalize(target(v), dim=1) for v in views]
            loss = contrastive(qs[0], ks[1], queues[1]) + contrastive(qs[1], ks[0], queues[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(online.parameters(), 5.0)
        opt.step()
        for qu, k in zip(queues, ks):
            qu[ptr[0]:ptr[0] + batch] = k
        ptr[0] = (ptr[0] + batch) % queue

    return step


class _DinoHead:
    """768 -> 2048 -> 2048 -> 256 (GELU), L2-normalised, weight-normed linear to out_dim (norm fixed)."""

    def __init__(self, torch, out_dim: int):
        self.torch = torch
        self.mlp = _mlp(torch, [768, 2048, 2048, 256], bn=False)
        self.last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(256, out_dim, bias=False))
        self.last.parametrizations.weight.original0.requires_grad_(False)
        self.modules = torch.nn.ModuleList([self.mlp, self.last])

    def __call__(self, x):
        return self.last(self.torch.nn.functional.normalize(self.mlp(x), dim=-1))


def esvit_step_fn(torch, timm, amp, batch: int, size: int, local_size: int, num_local: int, out_dim: int):
    import copy
    F = torch.nn.functional
    student = _swin(timm, 0.1)
    heads = [_DinoHead(torch, out_dim), _DinoHead(torch, out_dim)]  # view level, region level
    teacher = copy.deepcopy(student).requires_grad_(False)
    teacher_heads = [copy.deepcopy(h.modules).requires_grad_(False) for h in heads]
    params = list(student.parameters()) + [p for h in heads for p in h.modules.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04)
    globals_ = torch.randn(2 * batch, 3, size, size)
    locals_ = torch.randn(num_local * batch, 3, local_size, local_size)
    centers = [torch.zeros(1, out_dim), torch.zeros(1, out_dim)]

    def tokens_of(model, x):
        t = model.forward_features(x)  # [B, h, w, 768] after the final norm
        t = t.flatten(1, 2)
        return t.mean(1), t

    def head(h, x):  # a deep-copied head (ModuleList [mlp, last])
        return h[1](F.normalize(h[0](x), dim=-1))

    def step():
        for h, th in zip(heads, teacher_heads):
            _ema(torch, th, h.modules, 0.996)
        _ema(torch, teacher, student, 0.996)
        with amp():
            loss, t_pool = esvit_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        with torch.no_grad(), amp():
            centers[0].mul_(0.9).add_(head(teacher_heads[0], t_pool).mean(0, keepdim=True), alpha=0.1)

    def esvit_loss():
        with torch.no_grad():
            t_pool, t_tok = tokens_of(teacher, globals_)
            t_view = F.softmax((head(teacher_heads[0], t_pool) - centers[0]) / 0.04, -1).chunk(2)
            t_reg = F.softmax((head(teacher_heads[1], t_tok) - centers[1]) / 0.04, -1)
        pools, toks = zip(*(tokens_of(student, x) for x in (globals_, locals_)))
        s_view = torch.cat([heads[0](p) for p in pools]).div(0.1).chunk(2 + num_local)
        view_loss, reg_loss, pairs = 0.0, 0.0, 0
        s_tok = [t for tk in toks for t in tk.chunk(len(tk) // batch)]
        for iq, q in enumerate(t_view):
            tq, tf = t_reg[iq * batch:(iq + 1) * batch], t_tok[iq * batch:(iq + 1) * batch]
            for iv, v in enumerate(s_view):
                if iv == iq:
                    continue
                view_loss = view_loss + torch.sum(-q * F.log_softmax(v, -1), -1).mean()
                # region term: each student token against its most similar teacher token
                match = torch.einsum("bsd,btd->bst", F.normalize(s_tok[iv], dim=-1),
                                     F.normalize(tf, dim=-1)).argmax(-1)
                target = torch.gather(tq, 1, match[..., None].expand(-1, -1, out_dim))
                s_reg = F.log_softmax(heads[1](s_tok[iv]) / 0.1, -1)
                reg_loss = reg_loss + torch.sum(-target * s_reg, -1).mean()
                pairs += 1
        return (view_loss + reg_loss) / pairs, t_pool

    return step


def backbone_fn(torch, timm, amp, name: str, batch: int, res: int, backward: bool):
    """timm's model in eval mode: the forward under no_grad, or forward + backward of a log-softmax loss."""
    m = timm.create_model(name, pretrained=False, num_classes=1000, img_size=res).eval()
    x = torch.randn(batch, 3, res, res)

    def forward():
        with torch.no_grad(), amp():
            m(x)

    def forward_backward():
        m.zero_grad(set_to_none=True)
        with amp():
            loss = torch.log_softmax(m(x).float(), -1)[:, 0].mean()
        loss.backward()

    return forward_backward if backward else forward


STEPS = {"moby": moby_step_fn, "esvit": esvit_step_fn, "backbone": backbone_fn}


def _serve(kind: str, setup: dict) -> None:
    import warnings
    warnings.filterwarnings("ignore")
    import functools

    import timm
    import torch
    device, dtype = setup.pop("device", "cpu"), setup.pop("dtype", "float32")
    if device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    else:
        torch.set_default_device(device)  # modules and tensors are created there
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as XLA's default precision on GPUs
    torch.manual_seed(0)
    amp = functools.partial(torch.autocast, device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    raw = STEPS[kind](torch, timm, amp, **setup)

    def step():
        raw()
        if device != "cpu":
            torch.cuda.synchronize()  # the timer counts the finished step, as ours blocks on its result

    step()  # warm-up
    info = {"torch": torch.__version__, "timm": timm.__version__}
    if device != "cpu":
        info["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    serve_steps(step, info)


if __name__ == "__main__":
    _serve(sys.argv[1], json.loads(sys.argv[2]))
