//! SGD (momentum, Nesterov, L2 weight decay) and AdamW, with PyTorch's update rules and a state
//! that can be saved and restored exactly (tch's optimizers keep theirs inside libtorch, out of
//! reach of a checkpoint).
//!
//! SGD, as `torch.optim.SGD` (dampening 0): `g += wd p`; `buf = g` on the first step, else
//! `buf = m buf + g`; `g = g + m buf` (Nesterov) or `g = buf`; `p -= lr g`.
//! AdamW, as `torch.optim.AdamW`: `p *= 1 - lr wd`; moments with bias correction; `p -= lr
//! m_hat / (sqrt(v_hat) + eps)`.

use axial_common::job::{OptimConfig, OptimizerName};
use tch::{Kind, Tensor};

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
        }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn zero_grad(&self) {
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

    /// Places the (defined) gradients in one buffer per all-reduce bucket
    /// ([`crate::collective::ddp::into_buckets`]): each bucket is then all-reduced in place.
    pub fn bucket_grads(&self, bucket_bytes: usize) {
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
        let wd = self.config.weight_decay;
        let first = self.steps == 0;
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
