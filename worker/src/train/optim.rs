//! SGD (momentum, Nesterov, L2 weight decay) and AdamW, with PyTorch's update rules and a state
//! that can be saved and restored exactly (tch's optimizers keep theirs inside libtorch, out of
//! reach of a checkpoint).
//!
//! SGD, as `torch.optim.SGD` (dampening 0): `g += wd p`; `buf = g` on the first step, else
//! `buf = m buf + g`; `g = g + m buf` (Nesterov) or `g = buf`; `p -= lr g`.
//! AdamW, as `torch.optim.AdamW`: `p *= 1 - lr wd`; moments with bias correction; `p -= lr
//! m_hat / (sqrt(v_hat) + eps)`.

use std::ffi::{c_char, c_int, c_void};

use axial_common::job::{OptimConfig, OptimizerName};
use tch::{Kind, Tensor};

#[allow(unsafe_code)]
mod ffi {
    use super::{c_char, c_int, c_void};
    unsafe extern "C" {
        /// csrc/sgd.cpp: SGD over n parameters in place.
        pub fn axial_sgd_step(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            bufs: *const *mut c_void,
            flags: *const u8,
            n: usize,
            lr: f64,
            momentum: f64,
            weight_decay: f64,
            nesterov: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        /// csrc/sgd.cpp: the n tensors' gradients undefined.
        pub fn axial_clear_grads(tensors: *const *mut c_void, n: usize);
    }
}

/// One trainable tensor and its optimizer state.
#[derive(Debug)]
struct Param {
    /// PyTorch name (for the checkpoint).
    name: String,
    tensor: Tensor,
    decay: bool,
    /// SGD: [momentum_buffer]; AdamW: [exp_avg, exp_avg_sq]. Empty before the first step.
    state: Vec<Tensor>,
}

#[derive(Debug)]
pub struct Optimizer {
    config: OptimConfig,
    params: Vec<Param>,
    steps: u64,
    /// Gradients are zeroed in place (they live in all-reduce buckets, or a CUDA graph
    /// accumulates into them), not dropped.
    grads_in_place: bool,
}

impl Optimizer {
    /// `params`: (PyTorch name, tensor). With `no_decay_norm_bias`, 1-D tensors (batch-norm
    /// scales and shifts, biases) get no weight decay.
    pub fn new(config: &OptimConfig, params: Vec<(String, Tensor)>) -> Self {
        let params = params
            .into_iter()
            .map(|(name, tensor)| Param {
                decay: !(config.no_decay_norm_bias && tensor.dim() <= 1),
                name,
                tensor,
                state: Vec::new(),
            })
            .collect();
        Self {
            config: config.clone(),
            params,
            steps: 0,
            grads_in_place: false,
        }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Clears the gradients for the next step: dropped (as `zero_grad(set_to_none=True)`), so
    /// that the next backward pass hands over its gradients instead of adding them into
    /// zeros, unless they must stay where they are ([`Self::bucket_grads`],
    /// [`Self::keep_grads_in_place`]): then zeroed in place.
    #[allow(unsafe_code)]
    pub fn zero_grad(&self) {
        if !self.grads_in_place {
            let params: Vec<*mut c_void> = self
                .params
                .iter()
                .map(|p| p.tensor.as_ptr() as *mut c_void)
                .collect();
            // SAFETY: live tensor handles (held by self.params) for the call.
            unsafe { ffi::axial_clear_grads(params.as_ptr(), params.len()) };
            return;
        }
        for p in &self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Gives every parameter a (zero) gradient, so that every rank all-reduces the same list
    /// even before its first backward pass.
    pub fn define_grads(&self) {
        let zero = self
            .params
            .iter()
            .map(|p| p.tensor.sum(Kind::Float) * 0.0)
            .fold(
                Tensor::zeros(
                    [],
                    (
                        Kind::Float,
                        self.params
                            .first()
                            .map_or(tch::Device::Cpu, |p| p.tensor.device()),
                    ),
                ),
                |a, b| a + b,
            );
        if zero.requires_grad() {
            zero.backward();
        }
    }

    /// Gradients from now on are zeroed in place, never dropped (a CUDA graph accumulates into
    /// them at the addresses it captured).
    pub fn keep_grads_in_place(&mut self) {
        self.grads_in_place = true;
    }

    /// Places the (defined) gradients in one buffer per all-reduce bucket
    /// ([`crate::collective::ddp::into_buckets`]): each bucket is then all-reduced in place,
    /// and the gradients stay there (zeroed in place).
    pub fn bucket_grads(&mut self, bucket_bytes: usize) {
        self.grads_in_place = true;
        let grads = self
            .params
            .iter()
            .map(|p| p.tensor.grad())
            .collect::<Vec<_>>();
        if grads.iter().all(Tensor::defined) {
            crate::collective::ddp::into_buckets(&grads, bucket_bytes);
        }
    }

    /// The gradients, for clipping and all-reduce.
    pub fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.tensor.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// The parameters, in the order of [`Self::grads`].
    pub fn params(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.tensor.shallow_clone())
            .collect()
    }

    /// Sets the weight decay of later steps (a hyperparameter change of a running job).
    pub fn set_weight_decay(&mut self, weight_decay: f64) {
        self.config.weight_decay = weight_decay;
    }

    /// Applies one update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        let first = self.steps == 0;
        if self.config.name == OptimizerName::Sgd && self.sgd_fused(lr, first) {
            self.steps += 1;
            return;
        }
        let wd = self.config.weight_decay;
        self.steps += 1;
        let t = self.steps as f64;
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let wd = if p.decay { wd } else { 0.0 };
                match self.config.name {
                    OptimizerName::Sgd => {
                        let m = self.config.momentum;
                        let mut g = if wd != 0.0 {
                            &grad + &p.tensor * wd
                        } else {
                            grad.shallow_clone()
                        };
                        if m != 0.0 {
                            if first || p.state.is_empty() {
                                p.state = vec![g.detach().copy()];
                            } else {
                                let _ = p.state[0].g_mul_scalar_(m).g_add_(&g);
                            }
                            g = if self.config.nesterov {
                                g + &p.state[0] * m
                            } else {
                                p.state[0].shallow_clone()
                            };
                        }
                        let _ = p.tensor.g_add_(&(g * (-lr)));
                    }
                    OptimizerName::Adamw => {
                        let [b1, b2] = self.config.betas;
                        if p.state.is_empty() {
                            p.state = vec![p.tensor.zeros_like(), p.tensor.zeros_like()];
                        }
                        if wd != 0.0 {
                            let _ = p.tensor.g_mul_scalar_(1.0 - lr * wd);
                        }
                        let _ = p.state[0].g_mul_scalar_(b1).g_add_(&(&grad * (1.0 - b1)));
                        let _ = p.state[1]
                            .g_mul_scalar_(b2)
                            .g_add_(&(&grad * &grad * (1.0 - b2)));
                        let c1 = 1.0 - b1.powf(t);
                        let c2 = 1.0 - b2.powf(t);
                        let denom = (&p.state[1] / c2).sqrt() + self.config.eps;
                        let _ = p.tensor.g_add_(&((&p.state[0] / &denom) * (-lr / c1)));
                    }
                }
            }
        });
    }

    /// SGD over every parameter in one call of the shim (csrc/sgd.cpp: one pass over each
    /// tensor, the same arithmetic as the separate operations of [`Self::step`]), when all of
    /// them, their gradients and momentum buffers are contiguous CPU float32 tensors; false
    /// (nothing done) otherwise. Parameters without a gradient are skipped, as in `step`.
    #[allow(unsafe_code)]
    fn sgd_fused(&mut self, lr: f64, first: bool) -> bool {
        let momentum = self.config.momentum;
        let fits = |t: &Tensor| {
            t.device() == tch::Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
        };
        let mut live = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            let state_ok = momentum == 0.0
                || first
                || p.state.is_empty()
                || p.state
                    .first()
                    .is_some_and(|b| fits(b) && b.size() == p.tensor.size());
            if !fits(&p.tensor) || !fits(&grad) || !state_ok {
                return false;
            }
            live.push((i, grad));
        }
        let mut params = Vec::with_capacity(live.len());
        let mut grads = Vec::with_capacity(live.len());
        let mut bufs = Vec::with_capacity(live.len());
        let mut flags = Vec::with_capacity(live.len());
        let mut fresh_ones = Vec::new();
        for (i, g) in &live {
            let p = &mut self.params[*i];
            // A first step's momentum buffer: the kernel sets it to the gradient.
            let fresh = momentum != 0.0 && (first || p.state.is_empty());
            if fresh {
                p.state = vec![p.tensor.detach().empty_like()];
                fresh_ones.push(*i);
            }
            flags.push(u8::from(p.decay) | (u8::from(fresh) << 1));
            params.push(p.tensor.as_ptr() as *mut c_void);
            grads.push(g.as_ptr() as *mut c_void);
            bufs.push(
                p.state
                    .first()
                    .map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut c_void),
            );
        }
        // SAFETY: live tensor handles (kept alive by self.params and `live`) for the call; the
        // shim checks each one's device, dtype, layout and size before writing, and writes at
        // most len bytes into the error buffer.
        let done = crate::shim::call(|err, len| unsafe {
            ffi::axial_sgd_step(
                params.as_ptr(),
                grads.as_ptr(),
                bufs.as_ptr(),
                flags.as_ptr(),
                live.len(),
                lr,
                momentum,
                self.config.weight_decay,
                c_int::from(self.config.nesterov),
                err,
                len,
            )
        });
        // Checked beforehand, so an error here is a bug. The shim checks every tensor before it
        // writes any, so on an error nothing moved: the new, unwritten momentum buffers go
        // again and the separate operations take the step.
        debug_assert!(done.is_ok(), "{done:?}");
        if done.is_err() {
            for i in fresh_ones {
                self.params[i].state.clear();
            }
        }
        done.is_ok()
    }

    /// The state as named tensors (`momentum_buffer.<name>` or `exp_avg.<name>`,
    /// `exp_avg_sq.<name>`), on the CPU.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let names: &[&str] = match self.config.name {
            OptimizerName::Sgd => &["momentum_buffer"],
            OptimizerName::Adamw => &["exp_avg", "exp_avg_sq"],
        };
        let mut out = Vec::new();
        for p in &self.params {
            for (kind, t) in names.iter().zip(&p.state) {
                out.push((format!("{kind}.{}", p.name), t.to_device(tch::Device::Cpu)));
            }
        }
        out
    }

    /// Restores what [`Self::state_tensors`] saved, after `steps` steps. Every parameter must
    /// have its state (or none may, when `steps` is 0).
    pub fn load_state(&mut self, steps: u64, tensors: Vec<(String, Tensor)>) -> Result<(), String> {
        let names: &[&str] = match self.config.name {
            OptimizerName::Sgd => &["momentum_buffer"],
            OptimizerName::Adamw => &["exp_avg", "exp_avg_sq"],
        };
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let mut missing = Vec::new();
        let mut restored = Vec::new();
        for p in &self.params {
            let mut state = Vec::new();
            for kind in names {
                let key = format!("{kind}.{}", p.name);
                match map.get(&key) {
                    Some(t) if t.size() == p.tensor.size() => {
                        state.push(t.to_kind(Kind::Float).to_device(p.tensor.device()))
                    }
                    Some(t) => missing.push(format!(
                        "{key} (shape {:?}, expected {:?})",
                        t.size(),
                        p.tensor.size()
                    )),
                    None if steps == 0 => {}
                    None if self.config.name == OptimizerName::Sgd
                        && self.config.momentum == 0.0 => {}
                    None => missing.push(key),
                }
            }
            restored.push(state);
        }
        if !missing.is_empty() {
            return Err(format!(
                "optimizer state lacks or mis-shapes: {}",
                missing.join(", ")
            ));
        }
        for (p, state) in self.params.iter_mut().zip(restored) {
            p.state = state;
        }
        self.steps = steps;
        Ok(())
    }
}

/// Scales every gradient so that their global L2 norm is at most `max_norm`, without reading
/// the norm back to the host. Returns the norm before clipping (a 0-d tensor).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Tensor {
    tch::no_grad(|| {
        let squares: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        let norm = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt();
        let coef = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
        for g in grads {
            let _ = g.shallow_clone().g_mul_(&coef.to_kind(g.kind()));
        }
        norm
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three steps of SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 0.01) on a linear
    /// loss, against the torch.optim.SGD update rule written out in plain f64.
    #[test]
    fn sgd_nesterov_follows_the_pytorch_rule() {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let cfg = OptimConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
            ..OptimConfig::default()
        };
        let mut opt = Optimizer::new(&cfg, vec![("p".into(), p.shallow_clone())]);
        let (mut pp, mut buf) = ([1.0f64, -2.0], [0.0f64; 2]);
        for step in 0..3 {
            opt.zero_grad();
            (&p * Tensor::from_slice(&[0.5f64, 0.25]))
                .sum(Kind::Double)
                .backward();
            opt.step(0.1);
            for ((p, b), grad) in pp.iter_mut().zip(buf.iter_mut()).zip([0.5, 0.25]) {
                let g = grad + 0.01 * *p;
                *b = if step == 0 { g } else { 0.9 * *b + g };
                *p -= 0.1 * (g + 0.9 * *b);
            }
        }
        for (i, want) in pp.iter().enumerate() {
            assert!((p.double_value(&[i as i64]) - want).abs() < 1e-12);
        }
        assert_eq!(opt.state_tensors().len(), 1);
    }

    /// The fused SGD of float32 CPU tensors gives the bits of the separate operations it
    /// replaces, for a tensor large enough to be split over threads, one without weight
    /// decay, and one whose gradient appears only from the second step (its own first step).
    #[test]
    fn fused_sgd_equals_the_separate_operations() {
        tch::manual_seed(7);
        let cpu = (Kind::Float, tch::Device::Cpu);
        let shapes: [&[i64]; 3] = [&[300, 257], &[64], &[5, 3]];
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, cpu).set_requires_grad(true))
            .collect();
        let cfg = OptimConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 8e-5,
            no_decay_norm_bias: true,
            ..OptimConfig::default()
        };
        let (m, wd) = (cfg.momentum, cfg.weight_decay);
        let named = params
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
            .collect();
        let mut opt = Optimizer::new(&cfg, named);
        let mut want: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
        let mut bufs: Vec<Option<Tensor>> = vec![None, None, None];
        for step in 0..4 {
            opt.zero_grad();
            let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, cpu)).collect();
            for (i, p) in params.iter().enumerate() {
                if i == 2 && step == 0 {
                    continue;
                }
                (p * &grads[i]).sum(Kind::Float).backward();
            }
            let lr = 0.1 / (step + 1) as f64;
            // `step` would fall back to the separate operations silently: call the fused one.
            let first = opt.steps == 0;
            assert!(
                opt.sgd_fused(lr, first),
                "float32 CPU tensors take the fused path"
            );
            opt.steps += 1;
            for (i, g) in grads.iter().enumerate() {
                if i == 2 && step == 0 {
                    continue;
                }
                let decay = i != 1;
                let d = if decay {
                    g + &want[i] * wd
                } else {
                    g.shallow_clone()
                };
                let b = match bufs[i].take() {
                    None => d.copy(),
                    Some(b) => b * m + &d,
                };
                let d = &d + &b * m;
                want[i] = &want[i] + d * (-lr);
                bufs[i] = Some(b);
            }
        }
        for (p, w) in params.iter().zip(&want) {
            assert!(
                p.detach().equal(w),
                "fused SGD differs from the separate ops"
            );
        }
        let state = opt.state_tensors();
        for ((_, got), b) in state.iter().zip(&bufs) {
            assert!(got.equal(b.as_ref().expect("a momentum buffer")));
        }
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let a = Tensor::from_slice(&[3.0f32, 0.0]);
        let b = Tensor::from_slice(&[0.0f32, 4.0]);
        let norm = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 1.0);
        assert!((norm.double_value(&[]) - 5.0).abs() < 1e-6);
        assert!(
            (a.double_value(&[0]) - 0.6).abs() < 1e-5 && (b.double_value(&[1]) - 0.8).abs() < 1e-5
        );
    }
}
