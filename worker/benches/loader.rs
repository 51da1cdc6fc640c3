//! Loader throughput: JPEG decode + RandomResizedCrop + flip + normalize to 224 px, through the
//! real loader (image folder source, loader threads, bounded queue), per thread count.
//!
//! `cargo bench -p axial-worker --bench loader [-- --images 256 --threads 1,2 --size 224 --dir D]`
//!
//! The source images are generated once into a temp folder: 320 x 256 JPEGs (quality 90) of
//! the built-in procedural dataset, a typical ImageNet-like file size after resizing.

use std::sync::Arc;
use std::time::Instant;

use axial_common::job::AugmentConfig;
use axial_worker::data::augment::Transform;
use axial_worker::data::builtin::render;
use axial_worker::data::imagefolder::ImageFolder;
use axial_worker::data::loader::{Loader, Plan};
use axial_worker::data::{Source, SplitKind};

mod common;
use common::arg;

fn main() {
    let n: usize = arg("--images", "256").parse().unwrap_or(256);
    let size: u32 = arg("--size", "224").parse().unwrap_or(224);
    let threads: Vec<usize> = arg("--threads", "1,2")
        .split(',')
        .filter_map(|t| t.parse().ok())
        .collect();
    // `--dir D`: the images are written there and kept (scripts/bench-loader-vs-pil.sh runs
    // Pillow on the same files); otherwise into a temp folder.
    let kept = arg("--dir", "");
    let temp = tempfile::tempdir();
    let root = if kept.is_empty() {
        match &temp {
            Ok(t) => t.path().to_path_buf(),
            Err(e) => {
                eprintln!("loader bench: no temp dir: {e}");
                std::process::exit(1);
            }
        }
    } else {
        std::path::PathBuf::from(&kept)
    };
    let mut bytes_total = 0u64;
    for i in 0..n {
        let s = render(0, 1, i, 256);
        let class = root.as_path().join(format!("c{}", s.label));
        let _ = std::fs::create_dir_all(&class);
        // Widen to 320 x 256 so that crops have an aspect ratio to work with.
        let img = image::RgbImage::from_fn(320, 256, |x, y| {
            let p = ((y * 256 + x.min(255)) * 3) as usize;
            image::Rgb([
                s.image.pixels[p],
                s.image.pixels[p + 1],
                s.image.pixels[p + 2],
            ])
        });
        let path = class.join(format!("{i:05}.jpg"));
        let Ok(file) = std::fs::File::create(&path) else {
            continue;
        };
        let mut enc =
            image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 90);
        if enc.encode_image(&img).is_err() {
            eprintln!("loader bench: cannot encode {}", path.display());
            std::process::exit(1);
        }
        drop(enc);
        bytes_total += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    }
    let source: Arc<dyn Source> = match ImageFolder::open(root.as_path()) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("loader bench: {e}");
            std::process::exit(1);
        }
    };
    let _ = SplitKind::Train;
    println!(
        "{n} JPEGs of 320x256 ({} KiB each on average) -> {size}x{size}, batch 32",
        bytes_total / n as u64 / 1024
    );
    println!("| loader threads | images/s | images/s per thread |");
    println!("|---|---|---|");
    for &t in &threads {
        // One warm-up pass (page cache), then the timed one.
        for timed in [false, true] {
            let plan = Plan::chunked((0..source.len()).collect(), 32, true, 0, 0);
            let start = Instant::now();
            let images: usize = Loader::start(
                source.clone(),
                Transform::new(size, AugmentConfig::default()),
                plan,
                t,
                8,
            )
            .map(|b| b.map_or(0, |b| b.len()))
            .sum();
            let rate = images as f64 / start.elapsed().as_secs_f64();
            if timed {
                println!("| {t} | {rate:.1} | {:.1} |", rate / t as f64);
            }
        }
    }
}
