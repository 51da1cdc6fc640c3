"""Checks the PyTorch twin (axial_twin.py) against the reference parity fixture.

    python check_fixtures.py [FIXTURE] [--verbose] [--strict] [--threads N]

FIXTURE defaults to /work/shared/fixtures/axial26-quarter-official-32px.safetensors (made by the
authors' axialnet.py; see shared/fixtures/README.md). Builds the twin from the file's metadata
(layers [1, 2, 4, 1], width 0.25, 10 classes, 32 px, 8 heads), loads `state.*` with
load_state_dict(strict=True), and replays the reference run: eval forward (no grad), then train
forward, mean cross-entropy, backward. Checks, with the README's tolerances:

- eval logits, train logits, loss: |a - b| <= 1e-4 + 1e-4 |b| elementwise;
- every parameter gradient: max |a - b| <= 1e-3 * max |b| (per tensor);
- running mean/var after the train forward: |a - b| <= 1e-5 + 1e-5 |b|; num_batches_tracked
  exactly;
- the parameter count, the state_dict names and the twin's own flatten_index buffers.

Float32 noise floor. This fixture is ill-conditioned in train mode: random BN statistics with
batch-4 statistics amplify rounding 10-25x per batch norm (worst: layer4, 4 values per channel),
so float32 results depend on kernel choice (toggling mkldnn moves the twin's train logits by
3e-4) and the reference's float32 gradients are up to ~1% away from a float64 evaluation. Some
gradients are also analytically zero (the biases of bn_similarity and of the height layer's
bn_output: softmax shift invariance, and the next bn_qkv's batch statistics), where any relative
bound is meaningless. So the script also replays the twin in float64 and, per tensor, accepts an
error up to 6x the twin's own max |float32 - float64| difference when the README bound is below
it. That floor is computed from the twin alone (a bug in the twin would not widen it). Measured
worst ratio error / own noise among the tensors outside the README bound: 3.0 (1 or 2 threads),
3.6 with mkldnn disabled. Such tensors are counted as "only within the f32 noise floor";
--strict applies the README tolerances alone (it fails on ~30 such tensors).

Prints one line per check (worst tensor and its max error; --verbose: one line per tensor) and
exits 1 on any failure.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from axial_twin import AxialAttentionNet, ModelConfig, parameter_count, read_safetensors  # noqa: E402

DEFAULT = "/work/shared/fixtures/axial26-quarter-official-32px.safetensors"


NOISE_FACTOR = 6.0


class Report:
    def __init__(self, verbose):
        self.verbose = verbose
        self.failed = []

    def check(self, name, rows):
        """rows: (tensor, max abs error, README bound, noise bound, ok by README, ok).
        Prints one line for the check (its worst tensor), plus failures (or all, --verbose)."""
        bad = [r for r in rows if not r[5]]
        floor_only = [r for r in rows if r[5] and not r[4]]

        def ratio(r):
            bound = max(r[2], r[3])
            return r[1] / bound if bound > 0 else (0.0 if r[1] == 0 else float("inf"))

        worst = max(rows, key=ratio)
        status = "ok  " if not bad else "FAIL"
        extra = f", {len(floor_only)} only within the f32 noise floor" if floor_only else ""
        print(f"{status} {name:<22} max err {worst[1]:.3e} (README bound {worst[2]:.1e}, "
              f"noise bound {worst[3]:.1e}; {worst[0]}); {len(rows)} tensor(s), "
              f"{len(bad)} failed{extra}")
        for r in rows if self.verbose else bad:
            tag = "ok  " if r[4] else ("ok~ " if r[5] else "FAIL")
            print(f"       {tag} {r[0]}: max err {r[1]:.3e}  README bound {r[2]:.1e}  "
                  f"noise bound {r[3]:.1e}")
        if bad:
            self.failed.append(name)


def compare(name, ours, ref, ours64, readme_bound, strict):
    """One row: elementwise README check, plus the float32 noise floor of this tensor
    (NOISE_FACTOR x max |twin f32 - twin f64|), which does not depend on the reference."""
    a, b, t = ours.detach().double(), ref.double(), ours64.detach().double()
    if a.shape != b.shape:
        return (name, float("inf"), 0.0, 0.0, False, False)
    err = (a - b).abs()
    max_err = err.max().item() if err.numel() else 0.0
    bound = readme_bound(b)  # scalar or elementwise
    ok_readme = bool((err <= bound).all())
    shown = bound.max().item() if torch.is_tensor(bound) else float(bound)
    noise = NOISE_FACTOR * ((a - t).abs().max().item() if a.numel() else 0.0)
    ok = ok_readme or (not strict and max_err <= noise)
    return (name, max_err, shown, 0.0 if strict else noise, ok_readme, ok)


def replay(cfg, state, x, labels, dtype):
    """The reference run: load, eval forward (no grad), train forward, loss, backward."""
    net = AxialAttentionNet(cfg)
    net.load_state_dict(state, strict=True)  # raises on any missing/unexpected/mis-shaped key
    net = net.to(dtype)
    net.eval()
    with torch.no_grad():
        logits_eval = net(x.to(dtype))
    net.train()
    logits_train = net(x.to(dtype))
    loss = F.cross_entropy(logits_train, labels)
    loss.backward()
    return {
        "logits_eval": logits_eval,
        "logits_train": logits_train.detach(),
        "loss": loss.detach().reshape(1),
        "grads": {n: p.grad for n, p in net.named_parameters() if p.grad is not None},
        "params": [n for n, _ in net.named_parameters()],
        "buffers": dict(net.named_buffers()),
    }


def main():
    ap = argparse.ArgumentParser(description="Check the twin against the parity fixture.")
    ap.add_argument("fixture", nargs="?", default=DEFAULT)
    ap.add_argument("--verbose", action="store_true", help="one line per tensor")
    ap.add_argument("--strict", action="store_true",
                    help="README tolerances only (no float32 noise-floor allowance)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: fastest for this tiny model, and immune to "
                         "OpenMP spin-waits on a busy machine)")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(args.threads)
    tensors, meta = read_safetensors(args.fixture)
    layers = [1, 2, 4, 1]
    if "layers" in meta.get("arch", ""):
        layers = [int(v) for v in meta["arch"].split("layers")[1].strip(" )").split(",")]
    cfg = ModelConfig(layers=layers, width=float(meta.get("width_multiplier", 0.25)),
                      heads=int(meta.get("heads", 8)),
                      num_classes=int(meta.get("num_classes", 10)),
                      image_size=int(meta.get("image_size", 32)))
    print(f"fixture {args.fixture}: {meta}")
    rep = Report(args.verbose)

    # Structure: parameter count, the twin's own index buffers, the strict load.
    net = AxialAttentionNet(cfg)
    n_params, want = parameter_count(net), int(meta.get("params", -1))
    rep.check("parameter count",
              [(f"{n_params} params", float(abs(n_params - want)), 0.0, 0.0,
                n_params == want, n_params == want)])
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    rows = []
    for name, buf in net.state_dict().items():
        if name.endswith("flatten_index"):
            ok = name in state and state[name].shape == buf.shape and torch.equal(state[name], buf)
            rows.append((name, 0.0 if ok else 1.0, 0.0, 0.0, ok, ok))
    rep.check("flatten_index buffers", rows)
    missing = sorted(set(state) - set(net.state_dict()))
    extra = sorted(set(net.state_dict()) - set(state))
    ok = not missing and not extra
    rep.check("state_dict names", [(f"{len(state)} entries", float(len(missing) + len(extra)),
                                    0.0, 0.0, ok, ok)])

    x, labels = tensors["input"], tensors["labels"]
    r32 = replay(cfg, state, x, labels, torch.float32)
    r64 = replay(cfg, state, x, labels, torch.float64)

    def allclose(atol, rtol):
        return lambda b: atol + rtol * b.abs()

    for key, ref, label in (("logits_eval", "logits_eval", "eval logits"),
                            ("logits_train", "logits_train", "train logits"),
                            ("loss", "loss_train", "loss")):
        rep.check(label, [compare(ref, r32[key], tensors[ref], r64[key], allclose(1e-4, 1e-4),
                                  args.strict)])

    rows = []
    grad_names = {k[len("grad."):] for k in tensors if k.startswith("grad.")}
    for name in sorted(set(r32["params"]) | grad_names):
        if name not in r32["grads"] or name not in grad_names:
            rows.append((name, float("inf"), 0.0, 0.0, False, False))
            continue
        rows.append(compare(name, r32["grads"][name], tensors["grad." + name],
                            r64["grads"][name], lambda b: 1e-3 * b.abs().max(), args.strict))
    rep.check("parameter gradients", rows)

    after = {k[len("after_train."):]: v for k, v in tensors.items()
             if k.startswith("after_train.")}
    stat_rows, count_rows = [], []
    for name in sorted(after):
        if name not in r32["buffers"]:
            stat_rows.append((name, float("inf"), 0.0, 0.0, False, False))
        elif name.endswith("num_batches_tracked"):
            ok = torch.equal(r32["buffers"][name], after[name])
            diff = float((r32["buffers"][name] - after[name]).abs())
            count_rows.append((name, diff, 0.0, 0.0, ok, ok))
        else:
            stat_rows.append(compare(name, r32["buffers"][name], after[name],
                                     r64["buffers"][name], allclose(1e-5, 1e-5), args.strict))
    rep.check("running mean/var", stat_rows)
    rep.check("num_batches_tracked", count_rows)

    print(f"{'PASS' if not rep.failed else 'FAIL'}: {len(rep.failed)} failed check(s) "
          f"in {time.time() - t0:.1f} s")
    sys.exit(1 if rep.failed else 0)


if __name__ == "__main__":
    main()
