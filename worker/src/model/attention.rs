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
    index: Mutex<Option<RelativeIndex>>,
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
            index: Mutex::new(None),
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
        if let Some(c) = cache.as_ref().filter(|c| c.len == len) {
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
        *cache = Some(RelativeIndex {
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
        let qkv = xs.conv1d(&self.qkv_transform, None::<&Tensor>, [1], [0], [1], 1);
        let qkv = self.bn_qkv.forward_t(&qkv, train).view([b, g, 2 * gp, len]);
        let parts = qkv.split_with_sizes([gp / 2, gp / 2, gp], 2);
        let (q, k, v) = match self.cfg.convention {
            Convention::Official => (&parts[0], &parts[1], &parts[2]),
            Convention::Seed => (&parts[1], &parts[0], &parts[2]),
        };

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
        let similarity = match &outside {
            Some(mask) => similarity.masked_fill(mask, f64::NEG_INFINITY),
            None => similarity,
        };
        let similarity = similarity.softmax(3, similarity.kind());
        if let Some(maps) = maps {
            maps.push(AttentionMap {
                layer: self.path.clone(),
                axis: self.cfg.axis,
                weights: similarity.detach().view([n, other, g, len, len]),
            });
        }

        // Outputs [B, G, gp, L]: content Σ a v and positional Σ a r^v, interleaved per channel.
        let sv = Tensor::einsum("bgij,bgcj->bgci", &[&similarity, v], None::<&[i64]>);
        let sve = Tensor::einsum("bgij,cij->bgci", &[&similarity, v_emb], None::<&[i64]>);
        let out = Tensor::cat(&[sv, sve], -1).view([b, 2 * c, len]);
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
}
