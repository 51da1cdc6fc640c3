//! The job file: one TOML document, parsed at load into typed, validated configuration.
//!
//! ```toml
//! [model]       # see crate::model
//! [data]        # format, train, val, image_size, loader threads; [data.augment]
//! [train]       # epochs, batch_size (per worker), seed, precision, accumulation, clipping
//! [optim]       # name, lr (per lr_reference_batch images), momentum, nesterov, weight_decay
//! [schedule]    # name, warmup_epochs
//! [checkpoint]  # dir, every_steps, keep
//! [eval]        # every_epochs
//! [metrics]     # listen
//! ```
//!
//! Unknown keys anywhere are rejected; every value error names the key, the value and what is
//! allowed. Defaults follow the authors' recipe (shared/reference/MODEL.md §6): SGD with Nesterov
//! momentum 0.9, lr 0.1 per 256 images, weight decay 8e-5, linear warmup for 10/130 of the run,
//! then a per-step cosine to zero.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::model::{ImageSize, ModelConfig, ModelSpec};

/// Where the samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Procedural images made on the fly (no download); `train`/`val` are sample counts.
    Builtin,
    /// One sub-folder per class of JPEG/PNG files; `train`/`val` are folders.
    Imagefolder,
    /// Tar shards of `<key>.jpg|png` + `<key>.cls`; `train`/`val` are shard patterns or manifests.
    Webdataset,
    /// The CIFAR-10 binary batches; `train`/`val` are the folder holding `data_batch_*.bin` /
    /// `test_batch.bin` (or single files).
    Cifar10,
    /// MNIST IDX files; `train`/`val` are folders (or image files with their label files beside).
    Mnist,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

/// Which batch norms compute their training statistics across all ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncBn {
    /// Every norm uses its own rank's batch (running statistics are averaged after each step).
    None,
    /// The attention layers' `bn_qkv`, `bn_similarity`, `bn_output` (default).
    Attention,
    /// Every batch norm.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Sgd,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleName {
    /// Linear warmup, then cosine to `min_lr` per step.
    Cosine,
    /// Linear warmup, then x `gamma` at each of `milestones` (epochs).
    Step,
    /// Linear warmup, then constant.
    Constant,
}

/// A split: a sample count (builtin) or a path / shard pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Split {
    Count(u64),
    Path(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// [min, max] area fraction of RandomResizedCrop.
    pub crop_scale: [f64; 2],
    /// [min, max] aspect ratio of RandomResizedCrop.
    pub crop_ratio: [f64; 2],
    pub hflip: bool,
    /// Per-channel mean and std of the normalization (ImageNet's by default).
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Evaluation: resize the shorter side to image_size / eval_crop, then centre-crop.
    pub eval_crop: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop_scale: [0.08, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: true,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            eval_crop: 0.875,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    pub train: Split,
    pub val: Split,
    /// Side of the square crops fed to the model (defaults to the model's image_size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<i64>,
    /// Decoding/augmentation threads.
    #[serde(default = "default_loader_threads")]
    pub loader_threads: usize,
    /// Batches decoded ahead of the training step (the bound of the queue).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Audit the data: every rank appends the index of each training sample it consumes to
    /// `<checkpoint dir>/samples/<worker>.log`, one line per micro-batch:
    /// `<generation> <epoch> <step> <index>...` (epoch from 0, the step the micro-batch is part
    /// of). With the generations' resume points, this shows each sample consumed exactly once
    /// per epoch across restarts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log_samples: bool,
    /// Tar shards (`format = "webdataset"`): how many shards are read at once; each next sample
    /// comes from one of them at random, so shards that each hold one class still give mixed
    /// batches. Other formats are read in a full permutation and take no window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_window: Option<usize>,
    /// Tar shards: samples held in the shuffle buffer after the window (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle_buffer: Option<usize>,
}

impl DataConfig {
    /// Shards open at once (`shard_window`, default 16).
    pub fn shard_window(&self) -> usize {
        self.shard_window.unwrap_or(16)
    }

    /// Samples in the shuffle buffer (`shuffle_buffer`, default 4096).
    pub fn shuffle_buffer(&self) -> usize {
        self.shuffle_buffer.unwrap_or(4096)
    }
}

fn default_loader_threads() -> usize {
    2
}
fn default_prefetch() -> usize {
    4
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: u64,
    /// Images per step per worker.
    pub batch_size: i64,
    pub seed: u64,
    /// Default: fp32 on CPU; choose bf16 (autocast) or fp16 (loss scaling) for CUDA.
    pub precision: Precision,
    /// Micro-batches per optimizer step.
    pub accumulate: u64,
    /// Clip the global gradient norm to this (0: off).
    pub clip_grad_norm: f64,
    pub label_smoothing: f64,
    /// cpu, cuda, cuda:N or auto.
    pub device: String,
    /// libtorch intra-op threads (0: libtorch's default).
    pub threads: i32,
    /// Log (and read the loss) every this many steps.
    pub log_every: u64,
    /// Synchronized batch norm across ranks: none, attention (default) or all.
    pub sync_bn: SyncBn,
    /// Start each gradient bucket's all-reduce during the backward pass, as soon as its
    /// gradients are in (true), or all-reduce every bucket after backward (false).
    pub overlap_allreduce: bool,
    /// Split each step's global batch over the ranks by their measured speed (the
    /// coordinator's straggler rebalancing) instead of evenly. Needs `sync_bn = "all"`, so
    /// that every norm sees the whole global batch and the step's math is that of the even
    /// split.
    pub rebalance: bool,
    /// Capture each micro-batch's forward and backward as one CUDA graph after a few warm-up
    /// steps and replay it (static shapes: full micro-batches replay, the rest run as usual).
    /// CUDA only; the synchronized batch norms' all-reduces inside the forward pass (more
    /// than one rank with `sync_bn` other than "none") keep the step uncaptured.
    pub cuda_graphs: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 64,
            seed: 0,
            precision: Precision::Fp32,
            accumulate: 1,
            clip_grad_norm: 0.0,
            label_smoothing: 0.0,
            device: "auto".into(),
            threads: 0,
            log_every: 20,
            sync_bn: SyncBn::Attention,
            overlap_allreduce: true,
            rebalance: false,
            cuda_graphs: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub name: OptimizerName,
    /// Learning rate for `lr_reference_batch` images per step; scaled linearly to the real
    /// global batch (Goyal et al.) unless `scale_lr = false`.
    pub lr: f64,
    pub lr_reference_batch: i64,
    pub scale_lr: bool,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// No weight decay on batch-norm parameters and biases.
    pub no_decay_norm_bias: bool,
    /// AdamW.
    pub betas: [f64; 2],
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            name: OptimizerName::Sgd,
            lr: 0.1,
            lr_reference_batch: 256,
            scale_lr: true,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 8e-5,
            no_decay_norm_bias: false,
            betas: [0.9, 0.999],
            eps: 1e-8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub name: ScheduleName,
    /// Linear warmup length; default 10/130 of the run (the recipe's 10 of 130 epochs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_epochs: Option<f64>,
    /// Step schedule: epochs at which the rate is multiplied by gamma.
    pub milestones: Vec<u64>,
    pub gamma: f64,
    /// Cosine floor.
    pub min_lr: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            name: ScheduleName::Cosine,
            warmup_epochs: None,
            milestones: Vec::new(),
            gamma: 0.1,
            min_lr: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    pub dir: PathBuf,
    /// Also checkpoint every this many steps (0: only at the end of each epoch).
    pub every_steps: u64,
    /// Checkpoints kept (the oldest are deleted once a newer one is committed).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs/axial"),
            every_steps: 0,
            keep: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub every_epochs: u64,
    /// Evaluation batch size (default: 2 x the training batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<i64>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every_epochs: 1,
            batch_size: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint ("" to turn it off; port 0 picks one).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
        }
    }
}

/// The job file as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    model: ModelSpec,
    data: DataConfig,
    #[serde(default)]
    train: TrainConfig,
    #[serde(default)]
    optim: OptimConfig,
    #[serde(default)]
    schedule: ScheduleConfig,
    #[serde(default)]
    checkpoint: CheckpointConfig,
    #[serde(default)]
    eval: EvalConfig,
    #[serde(default)]
    metrics: MetricsConfig,
}

/// A loaded, validated job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub checkpoint: CheckpointConfig,
    pub eval: EvalConfig,
    pub metrics: MetricsConfig,
}

impl JobConfig {
    /// Parses and validates a job file's text; `origin` names it in errors. Relative paths in
    /// `[data]` and `[checkpoint]` are taken relative to `base` (the file's folder).
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let file: JobFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        let mut model_spec = file.model;
        let mut data = file.data;
        // [data].image_size, when given, is the model's input size too.
        match (data.image_size, model_spec.image_size) {
            (Some(s), None) => {
                model_spec.image_size = Some(ImageSize {
                    height: s,
                    width: s,
                })
            }
            (None, Some(m)) if m.height == m.width => data.image_size = Some(m.height),
            (None, None) => {}
            (Some(s), Some(m)) if m.height == s && m.width == s => {}
            (s, m) => {
                return Err(ConfigError::invalid(
                    "data.image_size",
                    format!("{s:?}"),
                    format!(
                        "the square crops fed to the model must match model.image_size ({m:?})"
                    ),
                ));
            }
        }
        let model = model_spec.resolve()?;
        data.image_size = Some(model.image_size.height);
        let mut job = JobConfig {
            model,
            data,
            train: file.train,
            optim: file.optim,
            schedule: file.schedule,
            checkpoint: file.checkpoint,
            eval: file.eval,
            metrics: file.metrics,
        };
        job.resolve_paths(base);
        job.validate()?;
        Ok(job)
    }

    /// Reads a job file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Parse {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        // Relative paths in the file are relative to its folder, made absolute here so that the
        // resolved job means the same to a worker started in another directory.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let base = absolute.parent().unwrap_or(Path::new("/"));
        Self::parse(&text, &origin, base)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |s: &mut Split| {
            if let Split::Path(p) = s
                && Path::new(p.as_str()).is_relative()
            {
                *p = base.join(&*p).display().to_string();
            }
        };
        fix(&mut self.data.train);
        fix(&mut self.data.val);
        if self.checkpoint.dir.is_relative() && !self.checkpoint.dir.as_os_str().is_empty() {
            self.checkpoint.dir = base.join(&self.checkpoint.dir);
        }
    }

    /// The resolved job as TOML (saved with every checkpoint).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# unserializable: {e}"))
    }

    /// Square side of the model's input.
    pub fn image_size(&self) -> i64 {
        self.model.image_size.height
    }

    /// Warmup length in epochs (default 10/130 of the run).
    pub fn warmup_epochs(&self) -> f64 {
        self.schedule
            .warmup_epochs
            .unwrap_or(self.train.epochs as f64 * 10.0 / 130.0)
    }

    /// The learning rate at the peak, for a global batch of `global_batch` images per step.
    pub fn peak_lr(&self, global_batch: i64) -> f64 {
        if self.optim.scale_lr {
            self.optim.lr * global_batch as f64 / self.optim.lr_reference_batch as f64
        } else {
            self.optim.lr
        }
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.listen.parse().ok()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        if d.format == DataFormat::Builtin {
            for (key, split) in [("data.train", &d.train), ("data.val", &d.val)] {
                match split {
                    Split::Count(n) if (1..=100_000_000).contains(n) => {}
                    _ => {
                        return Err(ConfigError::invalid(
                            key,
                            format!("{split:?}"),
                            "a sample count 1..=100000000 for format = \"builtin\"",
                        ));
                    }
                }
            }
            if self.model.num_classes != crate::BUILTIN_CLASSES {
                return Err(ConfigError::invalid(
                    "model.num_classes",
                    self.model.num_classes,
                    format!("the builtin dataset has {} classes", crate::BUILTIN_CLASSES),
                ));
            }
        } else {
            for (key, split) in [("data.train", &d.train), ("data.val", &d.val)] {
                if !matches!(split, Split::Path(p) if !p.is_empty()) {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{split:?}"),
                        format!("a path or shard pattern for format = \"{:?}\"", d.format)
                            .to_lowercase(),
                    ));
                }
            }
        }
        for (key, value) in [
            ("data.shard_window", d.shard_window),
            ("data.shuffle_buffer", d.shuffle_buffer),
        ] {
            let Some(value) = value else { continue };
            if d.format != DataFormat::Webdataset {
                return Err(ConfigError::invalid(
                    key,
                    value,
                    format!(
                        "only for format = \"webdataset\" (tar shards); {} data is read in a \
                         full permutation of its samples",
                        format!("{:?}", d.format).to_lowercase()
                    ),
                ));
            }
        }
        if !(1..=4096).contains(&d.shard_window()) {
            return Err(ConfigError::invalid(
                "data.shard_window",
                d.shard_window(),
                "1..=4096 shards open at once",
            ));
        }
        if d.shuffle_buffer() > 10_000_000 {
            return Err(ConfigError::invalid(
                "data.shuffle_buffer",
                d.shuffle_buffer(),
                "0..=10000000 samples",
            ));
        }
        if !(1..=64).contains(&d.loader_threads) {
            return Err(ConfigError::invalid(
                "data.loader_threads",
                d.loader_threads,
                "1..=64",
            ));
        }
        if !(1..=256).contains(&d.prefetch) {
            return Err(ConfigError::invalid(
                "data.prefetch",
                d.prefetch,
                "1..=256 batches",
            ));
        }
        let a = &d.augment;
        let [lo, hi] = a.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(ConfigError::invalid(
                "data.augment.crop_scale",
                format!("{:?}", a.crop_scale),
                "[min, max] with 0 < min <= max <= 1",
            ));
        }
        let [rlo, rhi] = a.crop_ratio;
        if !(rlo > 0.0 && rlo <= rhi && rhi.is_finite()) {
            return Err(ConfigError::invalid(
                "data.augment.crop_ratio",
                format!("{:?}", a.crop_ratio),
                "[min, max] aspect ratios with 0 < min <= max",
            ));
        }
        if a.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            return Err(ConfigError::invalid(
                "data.augment.std",
                format!("{:?}", a.std),
                "three positive numbers",
            ));
        }
        if !(a.eval_crop > 0.0 && a.eval_crop <= 1.0) {
            return Err(ConfigError::invalid(
                "data.augment.eval_crop",
                a.eval_crop,
                "0 < eval_crop <= 1",
            ));
        }
        let t = &self.train;
        if !(1..=100_000).contains(&t.epochs) {
            return Err(ConfigError::invalid("train.epochs", t.epochs, "1..=100000"));
        }
        if !(1..=65_536).contains(&t.batch_size) {
            return Err(ConfigError::invalid(
                "train.batch_size",
                t.batch_size,
                "1..=65536 images per worker",
            ));
        }
        if !(1..=1024).contains(&t.accumulate) {
            return Err(ConfigError::invalid(
                "train.accumulate",
                t.accumulate,
                "1..=1024 micro-batches",
            ));
        }
        if !(t.clip_grad_norm >= 0.0 && t.clip_grad_norm.is_finite()) {
            return Err(ConfigError::invalid(
                "train.clip_grad_norm",
                t.clip_grad_norm,
                "0 (off) or a positive norm",
            ));
        }
        if !(0.0..1.0).contains(&t.label_smoothing) {
            return Err(ConfigError::invalid(
                "train.label_smoothing",
                t.label_smoothing,
                "0 <= smoothing < 1",
            ));
        }
        let device_ok = matches!(t.device.as_str(), "auto" | "cpu" | "cuda")
            || t.device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !device_ok {
            return Err(ConfigError::invalid(
                "train.device",
                format!("{:?}", t.device),
                "auto, cpu, cuda or cuda:N",
            ));
        }
        if !(0..=1024).contains(&t.threads) {
            return Err(ConfigError::invalid(
                "train.threads",
                t.threads,
                "0 (libtorch default) ..= 1024",
            ));
        }
        if t.log_every == 0 {
            return Err(ConfigError::invalid(
                "train.log_every",
                t.log_every,
                "at least 1 step",
            ));
        }
        if t.rebalance && t.sync_bn != SyncBn::All {
            return Err(ConfigError::invalid(
                "train.rebalance",
                true,
                "sync_bn = \"all\" with it (a rank's local batch-norm statistics would depend \
                 on its share of the batch, so the step would no longer be the even split's)",
            ));
        }
        if t.cuda_graphs && t.device == "cpu" {
            return Err(ConfigError::invalid(
                "train.cuda_graphs",
                true,
                "a CUDA device (train.device = \"cpu\" has no CUDA graphs; set device to \
                 \"cuda\", \"cuda:N\" or \"auto\", or cuda_graphs = false)",
            ));
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr.is_finite() && o.lr <= 100.0) {
            return Err(ConfigError::invalid("optim.lr", o.lr, "0 < lr <= 100"));
        }
        if o.lr_reference_batch < 1 {
            return Err(ConfigError::invalid(
                "optim.lr_reference_batch",
                o.lr_reference_batch,
                "at least 1 image",
            ));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(ConfigError::invalid(
                "optim.momentum",
                o.momentum,
                "0 <= momentum < 1",
            ));
        }
        if o.nesterov && o.momentum == 0.0 && o.name == OptimizerName::Sgd {
            return Err(ConfigError::invalid(
                "optim.nesterov",
                true,
                "Nesterov needs momentum > 0",
            ));
        }
        if !(0.0..=1.0).contains(&o.weight_decay) {
            return Err(ConfigError::invalid(
                "optim.weight_decay",
                o.weight_decay,
                "0 <= weight_decay <= 1",
            ));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(ConfigError::invalid(
                "optim.betas",
                format!("{:?}", o.betas),
                "two numbers in [0, 1)",
            ));
        }
        if !(o.eps > 0.0 && o.eps < 1.0) {
            return Err(ConfigError::invalid("optim.eps", o.eps, "0 < eps < 1"));
        }
        let s = &self.schedule;
        let warmup = self.warmup_epochs();
        if !(warmup >= 0.0 && warmup < self.train.epochs as f64) {
            return Err(ConfigError::invalid(
                "schedule.warmup_epochs",
                warmup,
                format!("0 <= warmup < train.epochs ({})", self.train.epochs),
            ));
        }
        if s.name == ScheduleName::Step {
            if s.milestones.is_empty() || s.milestones.windows(2).any(|w| w[0] >= w[1]) {
                return Err(ConfigError::invalid(
                    "schedule.milestones",
                    format!("{:?}", s.milestones),
                    "increasing epochs at which the rate drops (schedule.name = \"step\")",
                ));
            }
        } else if !s.milestones.is_empty() {
            return Err(ConfigError::invalid(
                "schedule.milestones",
                format!("{:?}", s.milestones),
                "only used with schedule.name = \"step\"",
            ));
        }
        if !(s.gamma > 0.0 && s.gamma <= 1.0) {
            return Err(ConfigError::invalid(
                "schedule.gamma",
                s.gamma,
                "0 < gamma <= 1",
            ));
        }
        if !(s.min_lr >= 0.0 && s.min_lr < self.optim.lr) {
            return Err(ConfigError::invalid(
                "schedule.min_lr",
                s.min_lr,
                "0 <= min_lr < optim.lr",
            ));
        }
        if self.checkpoint.dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "checkpoint.dir",
                "\"\"",
                "a folder for the checkpoints",
            ));
        }
        if !(1..=1000).contains(&self.checkpoint.keep) {
            return Err(ConfigError::invalid(
                "checkpoint.keep",
                self.checkpoint.keep,
                "1..=1000",
            ));
        }
        if self.eval.every_epochs == 0 {
            return Err(ConfigError::invalid("eval.every_epochs", 0, "at least 1"));
        }
        if let Some(b) = self.eval.batch_size
            && !(1..=65_536).contains(&b)
        {
            return Err(ConfigError::invalid("eval.batch_size", b, "1..=65536"));
        }
        if !self.metrics.listen.is_empty() && self.metrics_addr().is_none() {
            return Err(ConfigError::invalid(
                "metrics.listen",
                format!("{:?}", self.metrics.listen),
                "host:port such as \"127.0.0.1:9401\" (port 0 picks one), or \"\" for off",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
arch = "axial26s"
num_classes = 10
[data]
format = "builtin"
train = 1000
val = 100
image_size = 32
[train]
epochs = 13
batch_size = 32
"#;

    fn parse(text: &str) -> Result<JobConfig, ConfigError> {
        JobConfig::parse(text, "job.toml", Path::new("/jobs"))
    }

    #[test]
    fn defaults_follow_the_recipe() {
        let job = parse(GOOD).expect("valid");
        assert_eq!(job.optim.name, OptimizerName::Sgd);
        assert!(job.optim.nesterov);
        assert_eq!(job.optim.momentum, 0.9);
        assert_eq!(job.optim.weight_decay, 8e-5);
        assert_eq!(job.schedule.name, ScheduleName::Cosine);
        assert!(
            (job.warmup_epochs() - 1.0).abs() < 1e-12,
            "10/130 of 13 epochs"
        );
        assert!((job.peak_lr(256) - 0.1).abs() < 1e-12);
        assert!((job.peak_lr(64) - 0.025).abs() < 1e-12);
        assert_eq!(job.model.image_size.height, 32);
        assert_eq!(job.checkpoint.dir, Path::new("/jobs/runs/axial"));
        assert_eq!(job.train.precision, Precision::Fp32);
        // The resolved job round-trips.
        let again: JobConfig = toml::from_str(&job.to_toml()).expect("resolved job parses");
        assert_eq!(again, job);
    }

    #[test]
    fn invalid_job_files_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("epochs = 13", "epochs = 0", "train.epochs"),
            ("batch_size = 32", "batch_size = -4", "train.batch_size"),
            (
                "batch_size = 32",
                "batch_size = 32\nprecison = \"fp16\"",
                "precison",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\nprecision = \"fp8\"",
                "precision",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\nlabel_smoothing = 1.5",
                "train.label_smoothing",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\ndevice = \"tpu\"",
                "train.device",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\naccumulate = 0",
                "train.accumulate",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\nrebalance = true",
                "train.rebalance",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\nclip_grad_norm = -1.0",
                "train.clip_grad_norm",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\ndevice = \"cpu\"\ncuda_graphs = true",
                "train.cuda_graphs",
            ),
            ("format = \"builtin\"", "format = \"parquet\"", "format"),
            ("train = 1000", "train = \"/data/train\"", "data.train"),
            ("train = 1000", "train = 0", "data.train"),
            (
                "num_classes = 10",
                "num_classes = 10\nimage_size = 64",
                "data.image_size",
            ),
            (
                "image_size = 32",
                "image_size = 32\nloader_threads = 0",
                "data.loader_threads",
            ),
            (
                "image_size = 32",
                "image_size = 32\n[data.augment]\ncrop_scale = [0.9, 0.1]",
                "data.augment.crop_scale",
            ),
            (
                "image_size = 32",
                "image_size = 32\n[data.augment]\nhflip = \"yes\"",
                "hflip",
            ),
            (
                "image_size = 32",
                "image_size = 32\n[data.augment]\nstd = [0.2, 0.0, 0.2]",
                "data.augment.std",
            ),
            ("num_classes = 10", "num_classes = 100", "model.num_classes"),
            ("arch = \"axial26s\"", "arch = \"axial27\"", "model.arch"),
            (
                "batch_size = 32",
                "batch_size = 32\n[optim]\nlr = 0.0",
                "optim.lr",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[optim]\nname = \"lamb\"",
                "name",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[optim]\nmomentum = 1.5",
                "optim.momentum",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[optim]\nmomentum = 0.0",
                "optim.nesterov",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[optim]\nweight_decay = -1.0",
                "optim.weight_decay",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[optim]\nbetas = [0.9, 1.0]",
                "optim.betas",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[schedule]\nwarmup_epochs = 20.0",
                "schedule.warmup_epochs",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[schedule]\nname = \"step\"",
                "schedule.milestones",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[schedule]\nname = \"step\"\nmilestones = [5, 3]",
                "schedule.milestones",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[schedule]\nmilestones = [5]",
                "schedule.milestones",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[schedule]\ngamma = 0.0",
                "schedule.gamma",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[checkpoint]\nkeep = 0",
                "checkpoint.keep",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[checkpoint]\ndir = \"\"",
                "checkpoint.dir",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[eval]\nevery_epochs = 0",
                "eval.every_epochs",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[metrics]\nlisten = \"localhost\"",
                "metrics.listen",
            ),
            (
                "batch_size = 32",
                "batch_size = 32\n[metrix]\nlisten = \"\"",
                "metrix",
            ),
            ("[data]", "[dataa]", "dataa"),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let err = parse(&text).expect_err(to).to_string();
            assert!(
                err.contains(key),
                "{to:?}: error {err:?} does not name {key}"
            );
        }
    }

    #[test]
    fn relative_paths_are_taken_from_the_job_file() {
        let text = GOOD
            .replace(
                "format = \"builtin\"\ntrain = 1000\nval = 100",
                "format = \"imagefolder\"\ntrain = \"data/train\"\nval = \"/abs/val\"",
            )
            .replace("arch = \"axial26s\"", "arch = \"axial26s\"\n");
        let job = parse(&text).expect("valid");
        assert_eq!(job.data.train, Split::Path("/jobs/data/train".into()));
        assert_eq!(job.data.val, Split::Path("/abs/val".into()));
    }
}
