//! Data that opens in seconds at ImageNet size: a synthetic manifest of 1,281,167 tiny PNGs in
//! 1,300 tar shards (generated once, ~2.6 GB, into `--dir`, default
//! `~/.cache/axial/data/synthetic-imagenet`), then:
//!
//! - opening it cold (every shard's SHA-256 computed: the verified cache removed first), warm
//!   (a restarted worker: the verified cache holds the shards), and again in the same process
//!   (a re-formed group: `data::open_shared`);
//! - what a generation then plans: the data identity, the epoch's order and one rank's
//!   micro-batches (8 ranks, batch 256, accumulate 1);
//! - loader throughput over that rank's first `--samples` samples (decode and transform to
//!   8 px, `--threads` loader threads) against a plain sequential read of the shards they lie in.
//!
//! `cargo bench -p axial-worker --bench data_open [-- --samples 50000 --threads 2]`

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axial_common::job::{AugmentConfig, DataConfig, DataFormat, Split};
use axial_common::plan::{EpochPlan, StepPlan};
use axial_worker::data::augment::Transform;
use axial_worker::data::loader::{Loader, Plan};
use axial_worker::data::manifest::{self, Manifest, ShardEntry};
use axial_worker::data::{self, Source, SplitKind};

const SAMPLES: u64 = 1_281_167;
const SHARDS: u64 = 1_300;
const CLASSES: u64 = 1_000;

mod common;
use common::arg;

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("data_open bench: {what}: {e}");
    std::process::exit(1)
}

fn append(tar: &mut tar::Builder<impl Write>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, name, bytes)
}

/// The synthetic shards and their manifest, written once (the manifest last).
fn generate(dir: &Path) -> PathBuf {
    let manifest_path = dir.join("manifest.json");
    if manifest_path.exists() {
        return manifest_path;
    }
    let start = Instant::now();
    std::fs::create_dir_all(dir).unwrap_or_else(|e| fail("mkdir", e));
    let mut pngs = Vec::new();
    for c in 0..16u8 {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(8, 8, image::Rgb([c * 16, 255 - c * 16, 128]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap_or_else(|e| fail("encode", e));
        pngs.push(png);
    }
    let mut shards = Vec::new();
    for n in 0..SHARDS {
        let (first, end) = (SAMPLES * n / SHARDS, SAMPLES * (n + 1) / SHARDS);
        let name = format!("shard-{n:06}.tar");
        let file = std::fs::File::create(dir.join(&name)).unwrap_or_else(|e| fail("create", e));
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        for i in first..end {
            let key = format!("{i:08}");
            append(&mut tar, &format!("{key}.png"), &pngs[(i % 16) as usize])
                .and_then(|()| {
                    append(
                        &mut tar,
                        &format!("{key}.cls"),
                        (i % CLASSES).to_string().as_bytes(),
                    )
                })
                .unwrap_or_else(|e| fail("write", e));
        }
        tar.into_inner()
            .and_then(|mut w| w.flush())
            .unwrap_or_else(|e| fail("finish", e));
        let sha256 = manifest::sha256_file(&dir.join(&name)).unwrap_or_else(|e| fail("hash", e));
        shards.push(ShardEntry {
            path: name,
            samples: end - first,
            sha256,
        });
    }
    let m = Manifest {
        format: manifest::FORMAT.into(),
        classes: (0..CLASSES).map(|c| format!("n{c:08}")).collect(),
        samples: SAMPLES,
        shards,
    };
    let json = serde_json::to_vec(&m).unwrap_or_else(|e| fail("manifest", e));
    manifest::write_atomic(&manifest_path, &json).unwrap_or_else(|e| fail("manifest", e));
    println!(
        "generated {SAMPLES} samples in {SHARDS} shards in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    manifest_path
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let v = f();
    (v, start.elapsed().as_secs_f64())
}

fn main() {
    let default_dir = std::env::var_os("HOME").map_or_else(
        || PathBuf::from("synthetic-imagenet"),
        |h| PathBuf::from(h).join(".cache/axial/data/synthetic-imagenet"),
    );
    let dir = PathBuf::from(arg("--dir", &default_dir.to_string_lossy()));
    let samples: usize = arg("--samples", "50000").parse().unwrap_or(50_000);
    let threads: usize = arg("--threads", "2").parse().unwrap_or(2);
    let manifest_path = generate(&dir);
    let bytes: u64 = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "{SAMPLES} samples, {SHARDS} shards, {:.2} GB in {}",
        bytes as f64 / 1e9,
        dir.display()
    );
    let spec = manifest_path.to_string_lossy().into_owned();
    let open = || {
        axial_worker::data::webdataset::WebDataset::open(&spec).unwrap_or_else(|e| fail("open", e))
    };
    if let Some(cache) = manifest::verified_cache_path(&manifest_path) {
        let _ = std::fs::remove_file(cache);
    }
    let (_, cold) = timed(open);
    let (_, warm) = timed(open);
    let config = DataConfig {
        format: DataFormat::Webdataset,
        train: Split::Path(spec.clone()),
        val: Split::Path(spec.clone()),
        image_size: Some(8),
        loader_threads: threads,
        prefetch: 8,
        augment: AugmentConfig::default(),
        log_samples: false,
        shard_window: None,
        shuffle_buffer: None,
    };
    let (_, first) = timed(|| {
        data::open_shared(&config, SplitKind::Train, 0).unwrap_or_else(|e| fail("open", e))
    });
    let (source, again) = timed(|| {
        data::open_shared(&config, SplitKind::Train, 0).unwrap_or_else(|e| fail("open", e))
    });
    let (_, identity) = timed(|| data::identity(source.as_ref(), &config, 0));
    let layout = data::layout(source.as_ref(), &config);
    let (sequence, order_s) = timed(|| EpochPlan::new(&layout, 0, 0));
    let steps = StepPlan::even(0, 8, 256, sequence.len());
    let ((order, batches), rank_s) = timed(|| steps.micro_batches(&sequence, 0, 1));
    println!();
    println!("| what | seconds |");
    println!("|---|---|");
    println!(
        "| open cold (every shard hashed, {threads_h} hashing threads) | {cold:.2} |",
        threads_h = std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| open warm (a restarted worker: verified cache) | {warm:.3} |");
    println!(
        "| open in a re-formed group (same process, first / again) | {first:.3} / {again:.6} |"
    );
    println!("| data identity (fingerprint) | {identity:.3} |");
    println!(
        "| epoch order ({} samples, shard window 16, buffer 4096) | {order_s:.3} |",
        sequence.len()
    );
    println!(
        "| rank 0 of 8: its micro-batches ({} samples) | {rank_s:.3} |",
        order.len()
    );
    println!(
        "| a re-formation's data work in all (open again + identity + order + rank plan) | {:.3} |",
        again + identity + order_s + rank_s
    );

    // Loader throughput over rank 0's first samples, and a plain read of their shards.
    let take = samples.min(order.len());
    let ids: Vec<usize> = order[..take].iter().map(|&i| i as usize).collect();
    let plan = Plan {
        order: ids.clone(),
        batches: batches.iter().filter(|b| b.end <= take).cloned().collect(),
        train: true,
        epoch: 0,
        seed: 0,
    };
    let src: Arc<dyn Source> = source.clone();
    let (loaded, load_s) = timed(|| {
        Loader::start(
            src,
            Transform::new(8, AugmentConfig::default()),
            plan,
            threads,
            8,
        )
        .map(|b| b.map_or(0, |b| b.len()))
        .sum::<usize>()
    });
    let shards = source.shards().unwrap_or_default();
    let mut touched: Vec<usize> = ids
        .iter()
        .map(|&i| shards.partition_point(|s| s.first <= i as u64) - 1)
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let m = Manifest::load(&manifest_path).unwrap_or_else(|e| fail("manifest", e));
    let ((read_bytes, read_samples), read_s) = timed(|| {
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, mut n) = (0u64, 0u64);
        for &s in &touched {
            let Ok(mut f) = std::fs::File::open(dir.join(&m.shards[s].path)) else {
                continue;
            };
            while let Ok(k) = f.read(&mut buf) {
                if k == 0 {
                    break;
                }
                total += k as u64;
            }
            n += m.shards[s].samples;
        }
        (total, n)
    });
    println!();
    println!("| reading rank 0's first {take} samples | samples/s | MB/s |");
    println!("|---|---|---|");
    println!(
        "| loader ({threads} threads: read by offset, PNG decode, crop, flip, normalize; {loaded} samples) | {:.0} | - |",
        loaded as f64 / load_s
    );
    println!(
        "| plain sequential read of the {} shards they lie in ({read_samples} samples, no decode) | {:.0} | {:.0} |",
        touched.len(),
        read_samples as f64 / read_s,
        read_bytes as f64 / 1e6 / read_s
    );
}
