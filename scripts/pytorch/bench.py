"""The train-step and eval-forward benchmark of the PyTorch twin, measured as axial's
`cargo bench -p axial-worker --bench train_step` measures its own (shared/reference/MODEL.md
section 7): axial26s with spans scaled to the input, 10 classes, batch 16, float32, random
data, SGD with momentum 0.9, Nesterov and weight decay 8e-5 (the recipe's defaults), 5 warm-up
steps, then the median of N. One configuration per process, so that its peak RSS is its own.

  python scripts/pytorch/bench.py --mode eager|compile --size 32 [--arch axial26s]
      [--batch 16] [--threads 2] [--iters 30] [--warmup 5] [--device cpu|cuda] [--amp bf16]
      [--channels-last]

Prints one JSON line: mode, size, train_images_per_s, eval_images_per_s, peak_rss_mb (and
peak_gpu_mb on CUDA).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from axial_twin import PRESETS, AxialAttentionNet, ModelConfig, init_like_rust  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--arch", default="axial26s")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args()
    if a.arch not in PRESETS or PRESETS[a.arch][0] != "official":
        sys.exit(f"bench.py: --arch {a.arch}: the twin builds the official variants only")
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = ModelConfig.from_table({"arch": a.arch, "num_classes": 10}, image_size=a.size)
    net = AxialAttentionNet(cfg)
    init_like_rust(net, seed=0)
    net = net.to(device)
    if a.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=8e-5)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.batch,), device=device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]

    def forward(train):
        net.train(train)
        if amp is None:
            return net(x)
        with torch.autocast(device.type, dtype=amp):
            return net(x)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(True), y)
        loss.backward()
        opt.step()
        return loss

    if a.mode == "compile":
        step = torch.compile(step)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n):
        times = []
        for i in range(a.warmup + n):
            t = time.perf_counter()
            fn()
            sync()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    train_s = timed(step, a.iters)
    eval_fn = lambda: forward(False)  # noqa: E731
    if a.mode == "compile":
        eval_fn = torch.compile(eval_fn)
    with torch.no_grad():
        eval_s = timed(eval_fn, a.iters)
    out = {
        "mode": a.mode,
        "size": a.size,
        "train_images_per_s": a.batch / train_s,
        "eval_images_per_s": a.batch / eval_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
