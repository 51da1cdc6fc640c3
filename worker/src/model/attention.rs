//! Position-sensitive axial attention along one axis (Wang et al., ECCV 2020, eq. 4; the
//! authors' PyTorch `AxialAttention`, shared/reference/MODEL.md §1).
//!
//! For query position o and key position p along the axis, per head:
//!
//! ```text
//! a_op = softmax_p( BN(q_o·k_p) + BN(q_o·r^q[o-p]) + BN(k_p·r^k[p-o]) )
//! y_o  = BN(Σ_p a_op v_p) + BN(Σ_p a_op r^v[o-p])
//! ```
//!
//! with q, k of depth gp/2 and v of depth gp per head, all three relative embeddings read from
//! one table `relative: [2gp, 2K-1]` (rows: q | k | v parts), and the batch norms named
//! `bn_qkv`, `bn_similarity` and `bn_output`.
//!
//! **Span.** K is a property of the weights, the axis length L a property of the input:
//! - L <= K: global attention; the table's centre `2L-1` columns are used. For L == K this is
//!   the reference computation exactly.
//! - L > K: local attention; query i sees keys with `|i - j| <= K - 1`. The logits of all L x L
//!   pairs go through `bn_similarity` (pairs outside the window carry their content term q·k
//!   and zero positional terms, so the batch statistics are taken over every pair, as in the
//!   dense reference), and the pairs outside the window are masked to -inf before the softmax.
//!   Neither reference implements this (DeepLab2 raises NotImplementedError).
//!
//! **Conventions.** `Official` splits each head's qkv channels as (q, k, v) and indexes the
//! table with `i - j + K - 1`; `Seed` splits them as (k, q, v) and indexes with `j - i + K - 1`
//! (and has no `bn_output`). Converting weights between the two (swap the q and k chunks of
//! every head, flip the table) gives the same function.

use std::sync::Mutex;

use tch::{Tensor, nn};

use super::attention_core;
use super::batch_norm::BatchNorm;

/// Which spatial axis a layer attends along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Height,
    Width,
}

/// Channel order inside a head and sign of the relative index (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    Official,
    Seed,
}

#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub in_planes: i64,
    pub out_planes: i64,
    pub heads: i64,
    /// Table size K: offsets `|i - j| <= K - 1` have an embedding.
    pub span: i64,
    pub axis: Axis,
    /// AvgPool (kernel = stride) applied to the output, as the official width layer does.
    pub stride: i64,
    pub convention: Convention,
    /// `bn_output` on the two output terms (official: yes; the seed has none).
    pub output_bn: bool,
}

/// Softmax weights of one layer, detached: `[N, other axis, heads, L (query), L (key)]`.
#[derive(Debug)]
pub struct AttentionMap {
    /// Parameter path of the layer, e.g. `layer1.0.height_block`.
    pub layer: String,
    pub axis: Axis,
    pub weights: Tensor,
}

#[derive(Debug)]
struct RelativeIndex {
    len: i64,
    /// `[L*L]` columns of the table (for L > K, out-of-window pairs point at a zero column).
    index: Tensor,
    /// `[L, L]`, true outside the window; only for L > K.
    outside: Option<Tensor>,
}

#[derive(Debug)]
pub struct AxialAttention {
    cfg: AttentionConfig,
    path: String,
    qkv_transform: Tensor,
    bn_qkv: BatchNorm,
    bn_similarity: BatchNorm,
    bn_output: Option<BatchNorm>,
    relative: Tensor,
    /// One entry per axis length seen, never dropped while the layer lives: a captured CUDA
    /// graph reads these tensors at their addresses, so an uncaptured pass at another length
    /// (an eval or a last short batch of another size) must not free the captured one's.
    index: Mutex<Vec<RelativeIndex>>,
}

impl AxialAttention {
    pub fn new(p: nn::Path, cfg: AttentionConfig) -> Self {
        let gp = cfg.out_planes / cfg.heads;
        let (qkv_init, rel_init) = match cfg.convention {
            // OFF reset_parameters: N(0, sqrt(1/Cin)) and N(0, sqrt(1/gp)).
            Convention::Official => (
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: (1.0 / cfg.in_planes as f64).sqrt(),
                },
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: (1.0 / gp as f64).sqrt(),
                },
            ),
            // SEED: PyTorch's Conv1d default (kaiming-uniform, a = sqrt 5) and randn.
            Convention::Seed => {
                let bound = 1.0 / (cfg.in_planes as f64).sqrt();
                (
                    nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                    nn::Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )
            }
        };
        Self {
            path: p.components().collect::<Vec<_>>().join("."),
            qkv_transform: (&p / "qkv_transform").var(
                "weight",
                &[2 * cfg.out_planes, cfg.in_planes, 1],
                qkv_init,
            ),
            bn_qkv: BatchNorm::new(&p / "bn_qkv", 2 * cfg.out_planes, false),
            bn_similarity: BatchNorm::new(&p / "bn_similarity", 3 * cfg.heads, false),
            bn_output: cfg
                .output_bn
                .then(|| BatchNorm::new(&p / "bn_output", 2 * cfg.out_planes, false)),
            relative: p.var("relative", &[2 * gp, 2 * cfg.span - 1], rel_init),
            index: Mutex::new(Vec::new()),
            cfg,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn config(&self) -> &AttentionConfig {
        &self.cfg
    }

    /// `bn_qkv`, `bn_similarity` and (official) `bn_output`.
    pub fn batch_norms(&self) -> Vec<&BatchNorm> {
        let mut v = vec![&self.bn_qkv, &self.bn_similarity];
        v.extend(self.bn_output.as_ref());
        v
    }

    /// The reference's index buffer for L = K (`flatten_index` / `distance_matrix`), `[K*K]` int64.
    pub fn index_buffer(&self) -> Tensor {
        let (idx, _) = relative_index(self.cfg.span, self.cfg.span, self.cfg.convention);
        Tensor::from_slice(&idx).to_device(self.relative.device())
    }

    fn index_for(&self, len: i64) -> (Tensor, Option<Tensor>) {
        let mut cache = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.iter().find(|c| c.len == len) {
            return (
                c.index.shallow_clone(),
                c.outside.as_ref().map(Tensor::shallow_clone),
            );
        }
        let device = self.relative.device();
        let (idx, outside) = relative_index(len, self.cfg.span, self.cfg.convention);
        let index = Tensor::from_slice(&idx).to_device(device);
        let outside = (len > self.cfg.span).then(|| {
            Tensor::from_slice(&outside)
                .view([len, len])
                .to_device(device)
        });
        let out = (
            index.shallow_clone(),
            outside.as_ref().map(Tensor::shallow_clone),
        );
        cache.push(RelativeIndex {
            len,
            index,
            outside,
        });
        out
    }

    /// `[N, Cin, H, W]` -> `[N, C, H/stride, W/stride]`. With `maps`, the softmax weights are
    /// appended to it (detached).
    pub fn forward_t(
        &self,
        xs: &Tensor,
        train: bool,
        maps: Option<&mut Vec<AttentionMap>>,
    ) -> Tensor {
        let (n, _, h, w) = xs.size4().unwrap_or((0, 0, 0, 0));
        let g = self.cfg.heads;
        let c = self.cfg.out_planes;
        let gp = c / g;
        // Put the attended axis last and fold the other one into the batch.
        let (xs, other, len) = match self.cfg.axis {
            Axis::Height => (xs.permute([0, 3, 1, 2]), w, h), // [N, W, Cin, H]
            Axis::Width => (xs.permute([0, 2, 1, 3]), h, w),  // [N, H, Cin, W]
        };
        let b = n * other;
        let xs = xs.contiguous().view([b, self.cfg.in_planes, len]);

        // qkv projection: [B, 2C, L] -> per head [q | k | v] (official) or [k | q | v] (seed).
        let qkv = if train {
            let qkv = xs.conv1d(&self.qkv_transform, None::<&Tensor>, [1], [0], [1], 1);
            self.bn_qkv.forward_t(&qkv, train)
        } else {
            // Eval: bn_qkv's affine map folded into the projection.
            let (weight, bias) = self.bn_qkv.fold(&self.qkv_transform);
            xs.conv1d(&weight, Some(&bias), [1], [0], [1], 1)
        }
        .view([b, g, 2 * gp, len]);

        // Relative embeddings E[c, i, j] for this axis length: [2gp, L, L].
        let (index, outside) = self.index_for(len);
        let table = if outside.is_some() {
            Tensor::cat(
                &[
                    self.relative.shallow_clone(),
                    self.relative.zeros_like().narrow(1, 0, 1),
                ],
                1,
            )
        } else {
            self.relative.shallow_clone()
        };
        let emb = table.index_select(1, &index).view([2 * gp, len, len]);

        let (qoff, koff) = match self.cfg.convention {
            Convention::Official => (0, gp / 2),
            Convention::Seed => (gp / 2, 0),
        };
        let fused = attention_core::applies(&qkv, maps.is_some())
            .then(|| {
                let core = attention_core::forward(
                    &qkv,
                    &emb,
                    &self.bn_similarity,
                    outside.as_ref(),
                    qoff,
                    koff,
                    train,
                );
                // The shim checks its inputs before it writes anything (the running statistics
                // included), so a refusal leaves the separate operations a clean start.
                core.map_err(|e| {
                    eprintln!(
                        "warning: {}: fused attention core refused, using separate operations: {e}",
                        self.path
                    )
                })
                .ok()
            })
            .flatten();
        let out = match fused {
            Some(out) => out,
            None => self.core_separate(&qkv, &emb, outside.as_ref(), train, maps, n),
        }
        .view([b, 2 * c, len]);
        let out = match &self.bn_output {
            Some(bn) => bn.forward_t(&out, train),
            None => out,
        };
        let out = out
            .view([n, other, c, 2, len])
            .sum_dim_intlist(3, false, None);
        let out = match self.cfg.axis {
            Axis::Height => out.permute([0, 2, 3, 1]), // [N, C, H, W]
            Axis::Width => out.permute([0, 2, 1, 3]),
        };
        if self.cfg.stride > 1 {
            let s = self.cfg.stride;
            out.avg_pool2d([s, s], [s, s], [0, 0], false, true, None)
        } else {
            out
        }
    }

    /// The core as separate operations (CUDA, other dtypes, attention maps): `qkv` `[B, G, 2gp, L]`, `emb` `[2gp, L, L]` -> `[B, G, gp, 2, L]`, the softmax
    /// weights appended to `maps` (`n` images).
    fn core_separate(
        &self,
        qkv: &Tensor,
        emb: &Tensor,
        outside: Option<&Tensor>,
        train: bool,
        maps: Option<&mut Vec<AttentionMap>>,
        n: i64,
    ) -> Tensor {
        let (b, g, _, len) = qkv.size4().unwrap_or((0, 0, 0, 0));
        let gp = self.cfg.out_planes / self.cfg.heads;
        let parts = qkv.split_with_sizes([gp / 2, gp / 2, gp], 2);
        let (q, k, v) = match self.cfg.convention {
            Convention::Official => (&parts[0], &parts[1], &parts[2]),
            Convention::Seed => (&parts[1], &parts[0], &parts[2]),
        };
        let emb = emb.split_with_sizes([gp / 2, gp / 2, gp], 0);
        let (q_emb, k_emb, v_emb) = (&emb[0], &emb[1], &emb[2]);
        // Similarity terms, each [B, G, L, L]: q·k, q·r^q and k·r^k.
        let qr = Tensor::einsum("bgci,cij->bgij", &[q, q_emb], None::<&[i64]>);
        let kr = Tensor::einsum("bgci,cij->bgij", &[k, k_emb], None::<&[i64]>).transpose(2, 3);
        let qk = Tensor::einsum("bgci,bgcj->bgij", &[q, k], None::<&[i64]>);
        let stacked = Tensor::cat(&[qk, qr, kr], 1); // [B, 3G, L, L]
        let similarity = self
            .bn_similarity
            .forward_t(&stacked, train)
            .view([b, 3, g, len, len])
            .sum_dim_intlist(1, false, None);
        let similarity = match outside {
            Some(mask) => similarity.masked_fill(mask, f64::NEG_INFINITY),
            None => similarity,
        };
        let similarity = similarity.softmax(3, similarity.kind());
        if let Some(maps) = maps {
            maps.push(AttentionMap {
                layer: self.path.clone(),
                axis: self.cfg.axis,
                weights: similarity.detach().view([n, b / n, g, len, len]),
            });
        }

        // Outputs [B, G, gp, L]: content Σ a v and positional Σ a r^v, interleaved per channel.
        let sv = Tensor::einsum("bgij,bgcj->bgci", &[&similarity, v], None::<&[i64]>);
        let sve = Tensor::einsum("bgij,cij->bgci", &[&similarity, v_emb], None::<&[i64]>);
        Tensor::stack(&[sv, sve], 3)
    }
}

/// Table columns for every (query i, key j) pair of an axis of length `len` with table size
/// `span`, row-major, and whether each pair lies outside the window. Out-of-window pairs point at
/// column `2K - 1`, which the caller fills with zeros.
fn relative_index(len: i64, span: i64, convention: Convention) -> (Vec<i64>, Vec<bool>) {
    let n = (len * len) as usize;
    let mut index = Vec::with_capacity(n);
    let mut outside = Vec::with_capacity(n);
    for i in 0..len {
        for j in 0..len {
            let offset = match convention {
                Convention::Official => i - j,
                Convention::Seed => j - i,
            };
            let out = offset.abs() > span - 1;
            index.push(if out { 2 * span - 1 } else { offset + span - 1 });
            outside.push(out);
        }
    }
    (index, outside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_the_reference_buffer() {
        // flatten_index[i*K + j] = i - j + K - 1 (OFF); distance_matrix = j - i + K - 1 (SEED).
        let (idx, out) = relative_index(3, 3, Convention::Official);
        assert_eq!(idx, vec![2, 1, 0, 3, 2, 1, 4, 3, 2]);
        assert!(out.iter().all(|o| !o));
        let (idx, _) = relative_index(3, 3, Convention::Seed);
        assert_eq!(idx, vec![2, 3, 4, 1, 2, 3, 0, 1, 2]);
    }

    #[test]
    fn shorter_axis_uses_the_table_centre() {
        let (idx, _) = relative_index(2, 4, Convention::Official);
        assert_eq!(idx, vec![3, 2, 4, 3]);
    }

    #[test]
    fn longer_axis_masks_outside_the_window() {
        let (idx, out) = relative_index(4, 2, Convention::Official);
        // |i - j| <= 1 inside; the rest point at the zero column 3.
        assert_eq!(idx, vec![1, 0, 3, 3, 2, 1, 0, 3, 3, 2, 1, 0, 3, 3, 2, 1]);
        assert_eq!(out.iter().filter(|o| **o).count(), 6);
    }

    /// A pass at another axis length must not free the index tensors of the first: a CUDA
    /// graph captured at that length reads them at their addresses on every replay.
    #[test]
    fn index_tensors_of_one_length_outlive_passes_at_another() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = AttentionConfig {
            in_planes: 8,
            out_planes: 16,
            heads: 2,
            span: 8,
            axis: Axis::Height,
            stride: 1,
            convention: Convention::Official,
            output_bn: true,
        };
        let layer = AxialAttention::new(vs.root() / "attn", cfg);
        // Held here, so that a rebuilt index cannot reuse the first one's memory.
        let first = layer.index_for(16);
        let before = (first.0.data_ptr(), first.1.as_ref().map(Tensor::data_ptr));
        let _ = layer.index_for(4);
        let (index, outside) = layer.index_for(16);
        assert_eq!(
            (index.data_ptr(), outside.as_ref().map(Tensor::data_ptr)),
            before,
            "the length-16 index was rebuilt after a pass at length 4"
        );
        assert!(outside.is_some(), "length 16 > span 8 has a window mask");
    }

    fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
        let scale = b.abs().max().double_value(&[]).max(0.1);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(
            diff <= tol * scale,
            "{what}: max |fused - separate| = {diff:e} against a scale of {scale:e}"
        );
    }

    /// The fused core against the separate operations on the same inputs: outputs, the
    /// gradients of a random linear function of them with respect to qkv, the embeddings and
    /// bn_similarity's scale and shift, and the running statistics after the step.
    fn fused_equals_separate(convention: Convention, span: i64, len: i64, train: bool) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = AttentionConfig {
            in_planes: 8,
            out_planes: 16,
            heads: 2,
            span,
            axis: Axis::Height,
            stride: 1,
            convention,
            output_bn: true,
        };
        let layer = AxialAttention::new(vs.root() / "attn", cfg);
        let bn = &layer.bn_similarity;
        tch::no_grad(|| {
            bn.weight
                .shallow_clone()
                .copy_(&(Tensor::rand([6], tch::kind::FLOAT_CPU) + 0.5));
            bn.bias
                .shallow_clone()
                .copy_(&Tensor::randn([6], tch::kind::FLOAT_CPU));
            bn.running_mean
                .shallow_clone()
                .copy_(&Tensor::randn([6], tch::kind::FLOAT_CPU));
            bn.running_var
                .shallow_clone()
                .copy_(&(Tensor::rand([6], tch::kind::FLOAT_CPU) + 0.5));
        });
        let (b, gp) = (6, 8);
        let qkv = (Tensor::randn([b, 2, 2 * gp, len], tch::kind::FLOAT_CPU) * 1.5)
            .set_requires_grad(true);
        let (index, outside) = layer.index_for(len);
        let table = Tensor::cat(
            &[
                layer.relative.shallow_clone(),
                layer.relative.zeros_like().narrow(1, 0, 1),
            ],
            1,
        );
        let emb = table
            .index_select(1, &index)
            .view([2 * gp, len, len])
            .detach()
            .set_requires_grad(true);
        let weights = Tensor::randn([b, 2, gp, 2, len], tch::kind::FLOAT_CPU);
        let stats = || (bn.running_mean.copy(), bn.running_var.copy());
        let start = stats();
        let run = |fused: bool| {
            tch::no_grad(|| {
                bn.running_mean.shallow_clone().copy_(&start.0);
                bn.running_var.shallow_clone().copy_(&start.1);
            });
            for t in [&qkv, &emb, &bn.weight, &bn.bias] {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let (qoff, koff) = match convention {
                Convention::Official => (0, gp / 2),
                Convention::Seed => (gp / 2, 0),
            };
            let out = if fused {
                attention_core::forward(&qkv, &emb, bn, outside.as_ref(), qoff, koff, train)
                    .expect("the fused core runs")
            } else {
                layer.core_separate(&qkv, &emb, outside.as_ref(), train, None, 1)
            };
            (&out * &weights).sum(tch::Kind::Float).backward();
            let grads: Vec<Tensor> = [&qkv, &emb, &bn.weight, &bn.bias]
                .iter()
                .map(|t| t.grad().copy())
                .collect();
            let (m, v) = stats();
            (out.detach(), grads, m, v)
        };
        let (out_f, grads_f, m_f, v_f) = run(true);
        let (out_s, grads_s, m_s, v_s) = run(false);
        let case = format!("{convention:?} span {span} len {len} train {train}");
        assert_close(&format!("{case}: output"), &out_f, &out_s, 1e-5);
        for (name, (f, s)) in ["qkv", "embeddings", "bn weight", "bn bias"]
            .iter()
            .zip(grads_f.iter().zip(&grads_s))
        {
            // (bn_similarity's bias gets no gradient: both are rounding noise around 0.)
            let tol = if *name == "bn bias" { 1e-3 } else { 1e-4 };
            assert_close(&format!("{case}: d {name}"), f, s, tol);
        }
        assert_close(&format!("{case}: running mean"), &m_f, &m_s, 1e-5);
        assert_close(&format!("{case}: running var"), &v_f, &v_s, 1e-5);
        if train {
            assert!(
                (&m_f - &start.0).abs().max().double_value(&[]) > 1e-3,
                "{case}: the running mean moved"
            );
        }
    }

    #[test]
    fn the_fused_core_equals_the_separate_operations() {
        for train in [true, false] {
            fused_equals_separate(Convention::Official, 8, 8, train);
            fused_equals_separate(Convention::Seed, 8, 8, train);
            // Local attention: a window of |i - j| <= 2 on an axis of 7.
            fused_equals_separate(Convention::Official, 3, 7, train);
            // An axis shorter than the table.
            fused_equals_separate(Convention::Official, 5, 3, train);
            // The lengths with vector kernels (4, 8 above, 16, 32), one of them windowed, and
            // the scalar kernels' 1 and 2.
            fused_equals_separate(Convention::Official, 4, 4, train);
            fused_equals_separate(Convention::Seed, 16, 16, train);
            fused_equals_separate(Convention::Official, 5, 16, train);
            fused_equals_separate(Convention::Official, 32, 32, train);
            fused_equals_separate(Convention::Official, 2, 2, train);
            fused_equals_separate(Convention::Official, 1, 1, train);
        }
    }
}
