//! `axial-worker demo`: builds a model and trains it for a few steps on one fixed random batch,
//! printing the loss (which must fall: the model memorizes the batch) and the throughput.
//! A smoke test of the whole stack (libtorch, CUDA when present, model, autograd, optimizer)
//! that needs no data.

use std::time::Instant;

use axial_common::{ModelConfig, ModelSpec};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::forward::parse_device;
use crate::model::Model;
use crate::train::{recipe_sgd, train_step};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Preset to build (ignored with --model).
    #[arg(long, default_value = "axial26s")]
    pub arch: String,
    /// TOML file with a [model] table, instead of --arch.
    #[arg(long, value_name = "M.toml")]
    pub model: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub image_size: i64,
    #[arg(long, default_value_t = 10)]
    pub classes: i64,
    #[arg(long, default_value_t = 16)]
    pub batch: i64,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// cpu, cuda, cuda:N, or auto (CUDA when present).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Loss at the first and the last step.
#[derive(Debug, Clone, Copy)]
pub struct DemoReport {
    pub first_loss: f64,
    pub last_loss: f64,
    pub images_per_second: f64,
}

pub fn run(args: &DemoArgs) -> Result<DemoReport> {
    let device = parse_device(&args.device).map_err(|message| crate::Error::BadTensor {
        path: "--device".into(),
        message,
    })?;
    let config = match &args.model {
        Some(path) => ModelConfig::from_file(path)?,
        None => ModelSpec {
            arch: Some(args.arch.clone()),
            num_classes: Some(args.classes),
            image_size: Some(axial_common::model::ImageSize {
                height: args.image_size,
                width: args.image_size,
            }),
            ..ModelSpec::default()
        }
        .resolve()?,
    };
    let model = Model::new(&config, device, 0);
    println!(
        "{} ({} layout), {} parameters, {}x{} input, batch {}, on {device:?}",
        config.arch.as_deref().unwrap_or("custom"),
        config.variant.as_str(),
        model.parameter_count(),
        config.image_size.height,
        config.image_size.width,
        args.batch
    );
    let images = Tensor::randn(
        [
            args.batch,
            3,
            config.image_size.height,
            config.image_size.width,
        ],
        (Kind::Float, device),
    );
    let labels = Tensor::randint(config.num_classes, [args.batch], (Kind::Int64, device));
    let mut opt = recipe_sgd(&model);
    let mut first_loss = f64::NAN;
    let mut last_loss = f64::NAN;
    let start = Instant::now();
    for step in 0..args.steps {
        let loss = train_step(&model.net, &mut opt, &images, &labels, args.lr)?;
        if step == 0 || step + 1 == args.steps || (step + 1) % 10 == 0 {
            let value = loss.double_value(&[]);
            if step == 0 {
                first_loss = value;
            }
            last_loss = value;
            println!("step {:>4}  loss {value:.4}", step + 1);
        }
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(device.index() as i64);
    }
    let images_per_second = (args.steps as i64 * args.batch) as f64 / start.elapsed().as_secs_f64();
    println!("{images_per_second:.1} images/s (forward + backward + SGD step)");
    Ok(DemoReport {
        first_loss,
        last_loss,
        images_per_second,
    })
}

/// `Device::Cuda(i)` -> i.
trait DeviceIndex {
    fn index(&self) -> usize;
}

impl DeviceIndex for Device {
    fn index(&self) -> usize {
        match self {
            Device::Cuda(i) => *i,
            _ => 0,
        }
    }
}
