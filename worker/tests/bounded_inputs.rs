//! Bounded inputs: random and truncated job files, dataset manifests, tar shards and images
//! give errors, never a panic, a hang or an out-of-memory. A deterministic fuzz: the same
//! inputs every run (seeded), a few thousand of them.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use axial_common::{JobConfig, Rng};
use axial_worker::data::manifest::Manifest;
use axial_worker::data::webdataset::WebDataset;
use axial_worker::data::{Image, Source};

/// `bytes` truncated at `n` evenly spread points, and with `n` random bytes changed.
fn mutations(bytes: &[u8], n: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for k in 0..n {
        out.push(bytes[..bytes.len() * k / n].to_vec());
        let mut flipped = bytes.to_vec();
        for _ in 0..1 + k % 4 {
            if flipped.is_empty() {
                break;
            }
            let at = rng.below(flipped.len() as u64) as usize;
            flipped[at] = rng.next_u64() as u8;
        }
        out.push(flipped);
    }
    out
}

/// Runs `f` and fails the test (with the input's index) if it panics.
fn no_panic(what: &str, i: usize, f: impl FnOnce() + std::panic::UnwindSafe) {
    if std::panic::catch_unwind(f).is_err() {
        panic!("{what} #{i} panicked");
    }
}

#[test]
fn job_files() {
    let text =
        std::fs::read(manifest_dir().join("../examples/quickstart.toml")).expect("quickstart");
    let mut rng = Rng::new(1);
    let inputs = mutations(&text, 400, &mut rng);
    let mut refused = 0;
    for (i, bytes) in inputs.iter().enumerate() {
        let text = String::from_utf8_lossy(bytes).into_owned();
        no_panic("job file", i, || {
            let _ = JobConfig::parse(&text, "fuzz", Path::new("/tmp"));
        });
        refused += usize::from(JobConfig::parse(&text, "fuzz", Path::new("/tmp")).is_err());
    }
    println!(
        "{} job files, {refused} refused with an error",
        inputs.len()
    );
    assert!(refused > inputs.len() / 4);
}

#[test]
fn manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = br#"{"format": "axial-webdataset/1", "classes": ["a", "b"], "samples": 3,
        "shards": [{"path": "s-0.tar", "samples": 3, "sha256": "00"}]}"#;
    let mut rng = Rng::new(2);
    let inputs = mutations(good, 200, &mut rng);
    for (i, bytes) in inputs.iter().enumerate() {
        let path = dir.path().join("manifest.json");
        std::fs::write(&path, bytes).expect("write");
        no_panic("manifest", i, || {
            let _ = Manifest::load(&path);
        });
    }
    println!("{} manifests, none panicked", inputs.len());
}

fn png(side: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_fn(side, side, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    out
}

fn jpeg(side: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_fn(side, side, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .expect("jpeg");
    out
}

/// A PNG whose header claims `side` x `side` pixels (its data would decode to far more memory
/// than the file holds).
fn png_claiming(side: u32) -> Vec<u8> {
    let mut bytes = png(4);
    // IHDR's width and height follow the 8-byte signature and the chunk's length and type.
    bytes[16..20].copy_from_slice(&side.to_be_bytes());
    bytes[20..24].copy_from_slice(&side.to_be_bytes());
    // A valid CRC over the chunk's type and data, so that only the size can be refused.
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// CRC-32 (IEEE), as PNG chunks use.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn images() {
    let mut rng = Rng::new(3);
    let mut inputs = mutations(&png(24), 300, &mut rng);
    inputs.extend(mutations(&jpeg(24), 300, &mut rng));
    let mut decoded = 0;
    for (i, bytes) in inputs.iter().enumerate() {
        no_panic("image", i, || {
            let _ = Image::decode(bytes);
        });
        decoded += usize::from(Image::decode(bytes).is_ok());
    }
    println!("{} images, {decoded} still decodable", inputs.len());
    let start = std::time::Instant::now();
    let huge = Image::decode(&png_claiming(200_000));
    println!("a PNG claiming 200000 x 200000 pixels: {huge:?}");
    let message = huge.expect_err("refused");
    assert!(message.to_lowercase().contains("limit"), "{message}");
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

fn tar_append(tar: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, name, bytes).expect("append");
}

#[test]
fn tar_shards() {
    let mut tar = tar::Builder::new(Vec::new());
    let image = png(8);
    for i in 0..4 {
        tar_append(&mut tar, &format!("{i:04}.png"), &image);
        tar_append(
            &mut tar,
            &format!("{i:04}.cls"),
            (i % 2).to_string().as_bytes(),
        );
    }
    tar_append(&mut tar, "0005.cls", b"99999999999999999999");
    let good = tar.into_inner().expect("tar");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(4);
    let inputs = mutations(&good, 150, &mut rng);
    let (mut opened, mut samples) = (0, 0);
    for (i, bytes) in inputs.iter().enumerate() {
        let path = dir.path().join("shard.tar");
        std::fs::write(&path, bytes).expect("write");
        no_panic("tar shard", i, || {
            if let Ok(source) = WebDataset::open(&path.to_string_lossy()) {
                for j in 0..source.len() {
                    let _ = source.get(j);
                }
            }
        });
        if let Ok(source) = WebDataset::open(&path.to_string_lossy()) {
            opened += 1;
            samples += (0..source.len()).filter(|&j| source.get(j).is_ok()).count();
        }
    }
    println!(
        "{} shards: {opened} opened, {samples} samples readable",
        inputs.len()
    );
}

/// This crate's directory: the one `cargo test` names at run time, else the one baked in at
/// compile time (a target dir shared with a checkout elsewhere reuses executables built there).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
