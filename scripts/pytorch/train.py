"""Trains the PyTorch twin (axial_twin.py) with axial's recipe, from an axial job file.

    python train.py JOB.toml [--order SAMPLES_LOG | --plan {permutation,shards1000}]
                             [--out history.json] [--init STATE.safetensors]
                             [--save FINAL.safetensors] [--quiet]

Reads the job TOML as `axial-worker train` does (common/src/job.rs: every default, relative
paths taken from the job file's folder, `[data] image_size` = `[model] image_size`) and runs
the single-worker training loop of worker/src/train/run.rs on the CPU, in float32:

- model: the official Axial-ResNet of `[model]`, initialized as the Rust port does
  (`init_like_rust`: same libtorch generator seeded with train.seed, same draw order), or from
  `--init` (a state dict under the reference names, e.g. a checkpoint's model.safetensors);
- data: `format = "imagefolder"` (PNG only), train/val folders; each epoch's order is axial's
  plan (common/src/plan.rs): a full permutation of the sample ids seeded by (train.seed,
  epoch), or with `--plan shards1000` the order axial used before it mixed classes (virtual shards of 1000
  samples permuted by (seed, epoch), samples within a shard by (seed, epoch, shard)); cut into
  steps of batch_size x accumulate samples (the last one smaller), each step into `accumulate`
  micro-batches; augmentation as worker/src/data/augment.rs with the per-sample stream
  Rng.derive(seed, [epoch, index]);
- `--order SAMPLES_LOG`: instead of the plan, exactly the micro-batches of axial's sample log
  (`[data] log_samples = true` writes `<checkpoint dir>/samples/<worker>.log`, one line per
  micro-batch, `<generation> <epoch> <step> <index>...`, epoch from 0). Lines with the same
  step number form one optimizer step (one line per step with accumulate = 1). Single-worker
  logs only;
- loss: mean cross-entropy with label smoothing train.label_smoothing; each micro-batch's loss
  weighted by its share of the step's samples; optional global-norm gradient clipping
  (train.clip_grad_norm);
- optimizer (worker/src/train/optim.rs): SGD as torch.optim.SGD (momentum, Nesterov, L2 weight
  decay, dampening 0) or AdamW as torch.optim.AdamW; optim.no_decay_norm_bias exempts 1-D
  tensors from weight decay. Peak lr = optim.lr x batch_size x accumulate / lr_reference_batch
  (unless scale_lr = false);
- schedule (worker/src/train/schedule.rs), evaluated every step from the fractional epoch:
  linear warmup to the peak reached at the end of the step, then cosine to schedule.min_lr,
  step decay (x gamma at each milestone epoch) or constant;
- evaluation on `[data] val` every eval.every_epochs epochs and after the last: top-1, top-5 and
  mean cross-entropy, eval transform (shorter side to size / eval_crop, centre crop).

Prints `epoch E train_loss X val_top1 Y` per epoch (E from 1, as axial's history; train_loss
is the mean of the epoch's micro-batch losses; val_top1 a fraction, the last evaluation's)
and, with --out, writes JSON: the job's resolved settings, one record per epoch
(epoch, step, train_loss, val_top1, val_top5, val_loss, seconds) and one per step
(step, epoch, lr, loss). Threads: torch.set_num_threads(train.threads, or 2 if 0).

Not reproduced: more than one worker (synchronized batch norm, gradient all-reduce), resume from
checkpoints, run-time hyperparameter changes, fp16/bf16, CUDA, the builtin/cifar10/mnist/
webdataset formats, JPEG decoding.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import tomllib

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from axial_data import ImageFolder, StepPlan, Transform, epoch_sequence, make_batch  # noqa: E402
from axial_twin import (AxialAttentionNet, ModelConfig, init_like_rust,  # noqa: E402
                        parameter_count, read_safetensors, write_safetensors)

# ---------------------------------------------------------------------------------------------
# The job file (common/src/job.rs)
# ---------------------------------------------------------------------------------------------

REQUIRED = object()

JOB_DEFAULTS = {
    "data": {
        "format": REQUIRED,
        "train": REQUIRED,
        "val": REQUIRED,
        "image_size": None,
        "loader_threads": 2,
        "prefetch": 4,
        "log_samples": False,
        "shard_window": None,  # tar shards only
        "shuffle_buffer": None,  # tar shards only
        "augment": {
            "crop_scale": [0.08, 1.0],
            "crop_ratio": [3.0 / 4.0, 4.0 / 3.0],
            "hflip": True,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "eval_crop": 0.875,
        },
    },
    "train": {
        "epochs": 10,
        "batch_size": 64,
        "seed": 0,
        "precision": "fp32",
        "accumulate": 1,
        "clip_grad_norm": 0.0,
        "label_smoothing": 0.0,
        "device": "auto",
        "threads": 0,
        "log_every": 20,
        "sync_bn": "attention",
        "overlap_allreduce": True,
    },
    "optim": {
        "name": "sgd",
        "lr": 0.1,
        "lr_reference_batch": 256,
        "scale_lr": True,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 8e-5,
        "no_decay_norm_bias": False,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
    },
    "schedule": {
        "name": "cosine",
        "warmup_epochs": None,  # default: epochs * 10 / 130
        "milestones": [],
        "gamma": 0.1,
        "min_lr": 0.0,
    },
    "checkpoint": {"dir": "runs/axial", "every_steps": 0, "keep": 3},
    "eval": {"every_epochs": 1, "batch_size": None},
    "metrics": {"listen": "127.0.0.1:0"},
}


def _merge(defaults: dict, given: dict, where: str) -> dict:
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    out = {}
    for key, default in defaults.items():
        if isinstance(default, dict):
            out[key] = _merge(default, given.get(key, {}), f"{where}.{key}")
        elif key in given:
            out[key] = given[key]
        elif default is REQUIRED:
            raise ValueError(f"{where}: missing key {key!r}")
        else:
            out[key] = copy.deepcopy(default)
    return out


def load_job(path: str):
    """Returns (ModelConfig, job dict with every default filled in)."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    unknown = set(doc) - set(JOB_DEFAULTS) - {"model"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}")
    if "model" not in doc or "data" not in doc:
        raise ValueError(f"{path}: tables [model] and [data] are required")
    job = {"model": doc["model"]}
    for table, defaults in JOB_DEFAULTS.items():
        job[table] = _merge(defaults, doc.get(table, {}), f"[{table}]")

    # [data].image_size, when given, is the model's input size too (JobConfig::parse).
    data_size, model_size = job["data"]["image_size"], doc["model"].get("image_size")
    if isinstance(model_size, int):
        model_size = [model_size, model_size]
    if data_size is not None and model_size is not None and model_size != [data_size] * 2:
        raise ValueError(f"data.image_size = {data_size} must match model.image_size "
                         f"({model_size})")
    size = [data_size] * 2 if data_size is not None else (model_size or [224, 224])
    if size[0] != size[1]:
        raise ValueError("the twin's data pipeline makes square crops: model.image_size must "
                         "be square")
    model = ModelConfig.from_table(doc["model"], image_size=tuple(size))
    job["data"]["image_size"] = size[0]

    base = os.path.dirname(os.path.abspath(path))
    for key in ("train", "val"):
        value = job["data"][key]
        if isinstance(value, str) and not os.path.isabs(value):
            job["data"][key] = os.path.join(base, value)
    if not os.path.isabs(job["checkpoint"]["dir"]):
        job["checkpoint"]["dir"] = os.path.join(base, job["checkpoint"]["dir"])
    if job["schedule"]["warmup_epochs"] is None:
        job["schedule"]["warmup_epochs"] = job["train"]["epochs"] * 10.0 / 130.0
    validate(job)
    return model, job


def validate(job):
    d, t, o, s = job["data"], job["train"], job["optim"], job["schedule"]
    if d["format"] != "imagefolder":
        raise ValueError(f"data.format = {d['format']!r}: the twin reads \"imagefolder\" only")
    for key in ("shard_window", "shuffle_buffer"):
        if d[key] is not None:
            raise ValueError(f"data.{key}: only for format = \"webdataset\" (tar shards)")
    lo, hi = d["augment"]["crop_scale"]
    if not (0 < lo <= hi <= 1):
        raise ValueError("data.augment.crop_scale: [min, max] with 0 < min <= max <= 1")
    rlo, rhi = d["augment"]["crop_ratio"]
    if not (0 < rlo <= rhi):
        raise ValueError("data.augment.crop_ratio: [min, max] with 0 < min <= max")
    if not (0 < d["augment"]["eval_crop"] <= 1):
        raise ValueError("data.augment.eval_crop: 0 < eval_crop <= 1")
    if not (1 <= t["epochs"] <= 100_000 and 1 <= t["batch_size"] <= 65_536
            and 1 <= t["accumulate"] <= 1024):
        raise ValueError("train.epochs / batch_size / accumulate out of range")
    if t["precision"] != "fp32":
        raise ValueError(f"train.precision = {t['precision']!r}: the twin runs fp32 on the CPU")
    if not (0 <= t["label_smoothing"] < 1) or t["clip_grad_norm"] < 0:
        raise ValueError("train.label_smoothing in [0, 1), train.clip_grad_norm >= 0")
    if o["name"] not in ("sgd", "adamw"):
        raise ValueError(f"optim.name = {o['name']!r}: sgd or adamw")
    if not (0 < o["lr"] <= 100) or o["lr_reference_batch"] < 1 or not (0 <= o["momentum"] < 1):
        raise ValueError("optim.lr, lr_reference_batch or momentum out of range")
    if o["nesterov"] and o["momentum"] == 0 and o["name"] == "sgd":
        raise ValueError("optim.nesterov: Nesterov needs momentum > 0")
    if s["name"] not in ("cosine", "step", "constant"):
        raise ValueError(f"schedule.name = {s['name']!r}: cosine, step or constant")
    if not (0 <= s["warmup_epochs"] < t["epochs"]):
        raise ValueError(f"schedule.warmup_epochs: 0 <= warmup < train.epochs ({t['epochs']})")
    ms = s["milestones"]
    if s["name"] == "step" and (not ms or any(a >= b for a, b in zip(ms, ms[1:]))):
        raise ValueError("schedule.milestones: increasing epochs (schedule.name = \"step\")")
    if s["name"] != "step" and ms:
        raise ValueError("schedule.milestones: only used with schedule.name = \"step\"")
    if not (0 < s["gamma"] <= 1) or not (0 <= s["min_lr"] < o["lr"]):
        raise ValueError("schedule.gamma in (0, 1], schedule.min_lr in [0, optim.lr)")
    if job["eval"]["every_epochs"] < 1:
        raise ValueError("eval.every_epochs: at least 1")


# ---------------------------------------------------------------------------------------------
# Optimizer, schedule, loss (worker/src/train/{optim,schedule,run}.rs)
# ---------------------------------------------------------------------------------------------


class Optimizer:
    """SGD / AdamW with the Rust port's update, op for op."""

    def __init__(self, config: dict, named_params):
        self.c = config
        self.params = [(name, p, not (config["no_decay_norm_bias"] and p.dim() <= 1), [])
                       for name, p in named_params]
        self.steps = 0

    def zero_grad(self):
        for _, p, _, _ in self.params:
            if p.grad is not None:
                p.grad.detach_().zero_()

    def grads(self):
        return [p.grad for _, p, _, _ in self.params if p.grad is not None]

    @torch.no_grad()
    def step(self, lr: float):
        first = self.steps == 0
        self.steps += 1
        t = float(self.steps)
        for _, p, decay, state in self.params:
            grad = p.grad
            if grad is None:
                continue
            wd = self.c["weight_decay"] if decay else 0.0
            if self.c["name"] == "sgd":
                m = self.c["momentum"]
                g = grad + p * wd if wd != 0.0 else grad
                if m != 0.0:
                    if first or not state:
                        state[:] = [g.detach().clone()]
                    else:
                        state[0].mul_(m).add_(g)
                    g = g + state[0] * m if self.c["nesterov"] else state[0]
                p.add_(g * (-lr))
            else:
                b1, b2 = self.c["betas"]
                if not state:
                    state[:] = [torch.zeros_like(p), torch.zeros_like(p)]
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                state[0].mul_(b1).add_(grad * (1.0 - b1))
                state[1].mul_(b2).add_(grad * grad * (1.0 - b2))
                c1 = 1.0 - b1 ** t
                c2 = 1.0 - b2 ** t
                denom = (state[1] / c2).sqrt() + self.c["eps"]
                p.add_((state[0] / denom) * (-lr / c1))


@torch.no_grad()
def clip_grad_norm(grads, max_norm: float):
    """Scales the gradients so that their global L2 norm is at most max_norm; returns the norm
    before clipping."""
    squares = [g.float().square().sum() for g in grads]
    norm = torch.stack(squares).sum().sqrt()
    # tch's `f64 / &Tensor` is `(tensor / f64).pow(-1)`.
    coef = ((norm + 1e-6) / max_norm).pow(-1).clamp_max(1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


class Schedule:
    def __init__(self, job: dict, peak: float):
        s = job["schedule"]
        self.name, self.peak, self.min_lr = s["name"], peak, s["min_lr"]
        self.warmup, self.epochs = s["warmup_epochs"], float(job["train"]["epochs"])
        self.milestones, self.gamma = s["milestones"], s["gamma"]

    def lr(self, before: float, after: float) -> float:
        """Rate for a step from fractional epoch `before` to `after`."""
        if after <= self.warmup and self.warmup > 0.0:
            return self.peak * after / self.warmup
        if self.name == "constant":
            return self.peak
        if self.name == "step":
            e = math.floor(before)
            return self.peak * self.gamma ** sum(1 for m in self.milestones if e >= m)
        length = max(self.epochs - self.warmup, 1e-9)
        frac = min(max((before - self.warmup) / length, 0.0), 1.0)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def smoothed_cross_entropy(logits, labels, eps: float):
    logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    nll = F.nll_loss(logp, labels)
    if eps == 0.0:
        return nll
    uniform = -logp.mean(dim=-1).mean()
    return nll * (1.0 - eps) + uniform * eps


# ---------------------------------------------------------------------------------------------
# The steps of a run
# ---------------------------------------------------------------------------------------------


def planned_epochs(job, n_train, shards1000=False):
    """axial's own plan: for each epoch, a list of steps; a step is (micro-batches, samples
    planned, consumed prefix after the step)."""
    batch, acc, seed = job["train"]["batch_size"], job["train"]["accumulate"], job["train"]["seed"]
    for epoch in range(job["train"]["epochs"]):
        seq = epoch_sequence(n_train, seed, epoch, shards1000)
        plan = StepPlan(0, 1, batch * acc, n_train)
        steps = []
        for s in range(plan.steps()):
            a, b = plan.range(s, 0)
            ids = seq[a:b]
            n = len(ids)
            micro = [ids[n * m // acc: n * (m + 1) // acc] for m in range(acc)]
            steps.append((micro, plan.step_samples(s), plan.prefix_after(s + 1)))
        yield epoch, steps


def logged_epochs(path, n_train):
    """The micro-batches of an axial sample log, grouped into steps (same step number) and
    epochs."""
    groups = []  # [epoch, step, [micro-batches]]
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 3:
                raise ValueError(f"{path}:{lineno}: expected <generation> <epoch> <step> ...")
            _, epoch, step = (int(v) for v in fields[:3])
            ids = [int(v) for v in fields[3:]]
            bad = [i for i in ids if not 0 <= i < n_train]
            if bad:
                raise ValueError(f"{path}:{lineno}: sample indices {bad[:5]} outside the "
                                 f"training folder's {n_train} samples")
            if groups and groups[-1][1] == step:
                if groups[-1][0] != epoch:
                    raise ValueError(f"{path}:{lineno}: step {step} spans two epochs")
                groups[-1][2].append(ids)
                continue
            if groups and (step <= groups[-1][1] or epoch < groups[-1][0]):
                raise ValueError(
                    f"{path}:{lineno}: step {step} (epoch {epoch}) after step {groups[-1][1]} "
                    f"(epoch {groups[-1][0]}): a resumed run that repeated steps, or several "
                    "workers' logs; the twin replays one single-worker run")
            groups.append([epoch, step, [ids]])
    epochs = {}
    for epoch, _, micro in groups:
        epochs.setdefault(epoch, []).append(micro)
    for epoch in sorted(epochs):
        consumed, steps = 0, []
        for micro in epochs[epoch]:
            n = sum(len(m) for m in micro)
            consumed += n
            steps.append((micro, n, consumed))
        yield epoch, steps


# ---------------------------------------------------------------------------------------------
# Evaluation (worker/src/train/eval.rs)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(net, source, transform, batch_size):
    net.eval()
    k = min(5, max(source.num_classes(), 1))
    correct1 = correct5 = loss_sum = 0.0
    samples = 0
    for lo in range(0, len(source), batch_size):
        images, labels, used = make_batch(source, transform,
                                          range(lo, min(lo + batch_size, len(source))),
                                          train=False, epoch=0, seed=0)
        if not used:
            continue
        logits = net(images).float()
        top = logits.topk(k, 1, True, True).indices
        hits = top.eq(labels.unsqueeze(1))
        correct1 += hits[:, :1].sum(dtype=torch.float64).item()
        correct5 += hits.sum(dtype=torch.float64).item()
        loss = F.nll_loss(F.log_softmax(logits, dim=-1), labels)
        loss_sum += loss.double().item() * len(used)
        samples += len(used)
    net.train()
    d = max(samples, 1)
    return {"top1": correct1 / d, "top5": correct5 / d, "loss": loss_sum / d, "samples": samples}


# ---------------------------------------------------------------------------------------------
# The run (worker/src/train/run.rs, one worker)
# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description="Train the PyTorch twin with axial's recipe.")
    ap.add_argument("job", help="axial job file (TOML)")
    ap.add_argument("--order", metavar="SAMPLES_LOG",
                    help="replay the micro-batches of axial's sample log instead of the plan")
    ap.add_argument("--plan", choices=("permutation", "shards1000"), default="permutation",
                    help="epoch order without --order: a full permutation (default, the "
                         "current plan) or the earlier virtual shards of 1000 samples")
    ap.add_argument("--out", metavar="FILE", help="write the per-epoch records as JSON")
    ap.add_argument("--init", metavar="STATE",
                    help="initial weights: a safetensors state dict under the reference names")
    ap.add_argument("--save", metavar="FILE", help="write the final state dict (safetensors)")
    ap.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    args = ap.parse_args()

    model_cfg, job = load_job(args.job)
    tr, data = job["train"], job["data"]
    torch.set_num_threads(tr["threads"] if tr["threads"] > 0 else 2)
    if tr["device"] not in ("auto", "cpu"):
        print(f"note: train.device = {tr['device']!r} ignored; the twin runs on the CPU",
              file=sys.stderr)
    train_src, val_src = ImageFolder(data["train"]), ImageFolder(data["val"])
    for name, src in (("train", train_src), ("val", val_src)):
        if src.num_classes() > model_cfg.num_classes:
            raise SystemExit(f"model.num_classes: the {name} data has {src.num_classes()} "
                             f"classes but the model {model_cfg.num_classes}")
    seed = tr["seed"]
    net = AxialAttentionNet(model_cfg)
    init_like_rust(net, seed)
    if args.init:
        state, _ = read_safetensors(args.init)
        state = {k[len("module."):] if k.startswith("module.") else k: v
                 for k, v in state.items()}
        net.load_state_dict(state, strict=True)
    net.train()
    named = sorted(net.named_parameters(), key=lambda kv: kv[0])
    optimizer = Optimizer(job["optim"], named)
    global_batch = tr["batch_size"] * tr["accumulate"]
    o = job["optim"]
    peak = o["lr"] * global_batch / o["lr_reference_batch"] if o["scale_lr"] else o["lr"]
    schedule = Schedule(job, peak)
    size = data["image_size"]
    transform = Transform(size, data["augment"])
    eval_batch = job["eval"]["batch_size"] or tr["batch_size"] * 2
    n_train = len(train_src)
    epochs = (logged_epochs(args.order, n_train) if args.order
              else planned_epochs(job, n_train, args.plan == "shards1000"))
    print(f"training the twin ({parameter_count(net)} parameters, layers {model_cfg.layers}, "
          f"width {model_cfg.width}, {size} px) on {n_train} train / {len(val_src)} val "
          f"samples, {tr['epochs']} epochs, steps of {global_batch}, peak lr {peak:.4f}, "
          f"{job['optim']['name']}, order: {args.order or 'axial plan, ' + args.plan}", file=sys.stderr)

    history, steps_log = [], []
    last_eval = {"top1": 0.0, "top5": 0.0, "loss": 0.0}
    step_count, t_start = 0, time.time()
    for epoch, steps in epochs:
        t_epoch = time.time()
        loss_sum, loss_n = 0.0, 0
        consumed = 0
        running, running_n = 0.0, 0
        for micro, step_samples, consumed_after in steps:
            step_loss = 0.0
            for ids in micro:
                images, labels, used = make_batch(train_src, transform, ids, train=True,
                                                  epoch=epoch, seed=seed)
                if not used:
                    continue
                logits = net(images)
                loss = smoothed_cross_entropy(logits, labels, tr["label_smoothing"])
                (loss * (len(used) / step_samples)).backward()
                value = loss.detach().double().item()
                loss_sum += value
                loss_n += 1
                running += value
                running_n += 1
                step_loss += value * len(used) / step_samples
            before = epoch + consumed / n_train
            consumed = consumed_after
            lr = schedule.lr(before, epoch + consumed / n_train)
            grads = optimizer.grads()
            if tr["clip_grad_norm"] > 0.0 and grads:
                clip_grad_norm(grads, tr["clip_grad_norm"])
            optimizer.step(lr)
            optimizer.zero_grad()
            step_count += 1
            steps_log.append({"step": step_count, "epoch": epoch, "lr": lr, "loss": step_loss})
            if not args.quiet and step_count % tr["log_every"] == 0:
                print(f"step {step_count}  epoch {epoch + 1}/{tr['epochs']}  loss "
                      f"{running / max(running_n, 1):.4f}  lr {lr:.5f}", file=sys.stderr)
                running, running_n = 0.0, 0
        train_loss = loss_sum / max(loss_n, 1)
        if (epoch + 1) % job["eval"]["every_epochs"] == 0 or epoch + 1 == tr["epochs"]:
            last_eval = evaluate(net, val_src, transform, eval_batch)
        record = {"epoch": epoch + 1, "step": step_count, "train_loss": train_loss,
                  "val_top1": last_eval["top1"], "val_top5": last_eval["top5"],
                  "val_loss": last_eval["loss"], "seconds": time.time() - t_epoch}
        history.append(record)
        print(f"epoch {epoch + 1} train_loss {train_loss:.4f} val_top1 {last_eval['top1']:.4f}",
              flush=True)

    if args.save:
        write_safetensors(args.save, net.state_dict())
    if args.out:
        out = {
            "job": os.path.abspath(args.job),
            "order": os.path.abspath(args.order) if args.order else f"plan ({args.plan})",
            "model": {"layers": model_cfg.layers, "width": model_cfg.width,
                      "heads": model_cfg.heads, "num_classes": model_cfg.num_classes,
                      "image_size": list(model_cfg.image_size), "span": model_cfg.span,
                      "parameters": parameter_count(net)},
            "peak_lr": peak,
            "steps": step_count,
            "wall_seconds": time.time() - t_start,
            "history": history,
            "step_log": steps_log,
        }
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
