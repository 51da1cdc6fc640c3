//! `axial-worker forward`: runs a model on tensors from files.
//!
//! What a user runs to check an imported checkpoint, and what a cross-framework parity check
//! needs. Inputs: `input` `[N, 3, H, W]` float; optionally `labels` `[N]` int64. Output file:
//! `logits`; with `--labels`, `loss` (mean cross-entropy, `[1]`) and `grad.<name>` for every
//! parameter; with `--train`, `after_train.<name>` for every running statistic and
//! `num_batches_tracked`; with `--attention`, `attention.<layer>` for every attention layer.
//! Names are those of the weights file's layout.

use std::path::{Path, PathBuf};

use axial_common::ModelConfig;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::weights::{NameTable, write_tensors_atomic};

#[derive(Debug, Clone, clap::Args)]
pub struct ForwardArgs {
    /// TOML file with a [model] table (a job file works too).
    #[arg(long, value_name = "M.toml")]
    pub model: PathBuf,
    /// Weights as a safetensors state dict under the layout's PyTorch names.
    #[arg(long, value_name = "W.safetensors")]
    pub weights: PathBuf,
    /// Safetensors file holding `input` [N, 3, H, W] float32.
    #[arg(long, value_name = "X.safetensors")]
    pub input: PathBuf,
    /// Where to write the results (safetensors).
    #[arg(long, value_name = "Y.safetensors")]
    pub output: PathBuf,
    /// Train mode: batch statistics, running statistics updated (written as after_train.*).
    #[arg(long)]
    pub train: bool,
    /// Safetensors file holding `labels` [N] int64: adds the loss and every gradient.
    #[arg(long, value_name = "L.safetensors")]
    pub labels: Option<PathBuf>,
    /// Also write every attention layer's softmax weights.
    #[arg(long)]
    pub attention: bool,
    /// cpu, cuda, cuda:N, or auto (CUDA when present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute in float64: a reference that shows how far float32 rounding alone moves each
    /// result (parity checks compare against a float32 fixture within that noise).
    #[arg(long)]
    pub double: bool,
}

/// Parses `cpu`, `cuda`, `cuda:N` or `auto`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("--device {s:?}: expected cpu, cuda, cuda:N or auto")),
    }
}

fn read_named(path: &Path, name: &str) -> Result<Tensor> {
    let tensors = Tensor::read_safetensors(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    tensors
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| Error::BadTensor {
            path: path.to_owned(),
            message: format!("no tensor named {name:?} (found: {})", names.join(", ")),
        })
}

/// Reads `input` and checks it is `[N, 3, H, W]` floating point.
pub fn read_input(path: &Path) -> Result<Tensor> {
    let x = read_named(path, "input")?;
    let size = x.size();
    if size.len() != 4 || size[1] != 3 || size[0] < 1 {
        return Err(Error::BadTensor {
            path: path.to_owned(),
            message: format!("input has shape {size:?}; expected [N, 3, H, W] with N >= 1"),
        });
    }
    if !matches!(
        x.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Err(Error::BadTensor {
            path: path.to_owned(),
            message: format!("input has dtype {:?}; expected float32", x.kind()),
        });
    }
    Ok(x.to_kind(Kind::Float))
}

/// Reads `labels` and checks it is `[n]` int64 with values in `0..classes`.
pub fn read_labels(path: &Path, n: i64, classes: i64) -> Result<Tensor> {
    let y = read_named(path, "labels")?;
    let bad = |message: String| Error::BadTensor {
        path: path.to_owned(),
        message,
    };
    if y.size() != [n] {
        return Err(bad(format!(
            "labels has shape {:?}; expected [{n}] (one per input)",
            y.size()
        )));
    }
    if !matches!(
        y.kind(),
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    ) {
        return Err(bad(format!(
            "labels has dtype {:?}; expected int64",
            y.kind()
        )));
    }
    let y = y.to_kind(Kind::Int64);
    let (lo, hi) = (y.min().int64_value(&[]), y.max().int64_value(&[]));
    if lo < 0 || hi >= classes {
        return Err(bad(format!(
            "labels range over {lo}..={hi}; the model has {classes} classes"
        )));
    }
    Ok(y)
}

/// Runs the command; returns the names written.
pub fn run(args: &ForwardArgs) -> Result<Vec<String>> {
    let device = parse_device(&args.device).map_err(|message| Error::BadTensor {
        path: PathBuf::from("--device"),
        message,
    })?;
    let config = ModelConfig::from_file(&args.model)?;
    let mut model = Model::new(&config, device, 0);
    model.load_weights(&args.weights)?;
    let mut input = read_input(&args.input)?.to_device(device);
    if args.double {
        model.vs.double();
        input = input.to_kind(Kind::Double);
    }
    let labels = match &args.labels {
        Some(p) => Some(read_labels(p, input.size()[0], config.num_classes)?.to_device(device)),
        None => None,
    };

    let names = NameTable::for_variant(config.variant);
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let (logits, maps) = tch::with_grad(|| {
        if args.attention {
            model.net.forward_with_attention(&input, args.train)
        } else {
            (model.net.forward_t(&input, args.train), Vec::new())
        }
    });
    if let Some(labels) = &labels {
        let loss = crate::model::cross_entropy(&logits, labels);
        loss.backward();
        out.push(("loss".to_owned(), loss.detach().reshape([1])));
        let mut grads: Vec<(String, Tensor)> = model
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, t)| (format!("grad.{}", names.external(&name)), t.grad()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(grads);
    }
    out.push(("logits".to_owned(), logits.detach()));
    if args.train {
        for (name, t) in model.state_dict() {
            let buffer = ["running_mean", "running_var", "num_batches_tracked"]
                .iter()
                .any(|b| name.ends_with(b));
            if buffer {
                out.push((format!("after_train.{name}"), t));
            }
        }
    }
    for map in maps {
        out.push((
            format!("attention.{}", names.external(&map.layer)),
            map.weights,
        ));
    }
    write_tensors_atomic(&args.output, &out)?;
    Ok(out.into_iter().map(|(n, _)| n).collect())
}
