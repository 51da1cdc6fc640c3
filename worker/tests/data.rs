//! Every data format loads from small generated fixtures; a corrupt image in a shard is skipped
//! and counted; the built-in dataset is not solvable by a linear classifier on pixels.

use std::path::Path;
use std::sync::Arc;

use axial_common::job::AugmentConfig;
use axial_worker::data::augment::Transform;
use axial_worker::data::builtin::Builtin;
use axial_worker::data::cifar::Cifar10;
use axial_worker::data::imagefolder::ImageFolder;
use axial_worker::data::loader::{Loader, Plan};
use axial_worker::data::manifest::{Manifest, prepare};
use axial_worker::data::mnist::Mnist;
use axial_worker::data::webdataset::WebDataset;
use axial_worker::data::{Source, SplitKind};
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};

/// An image folder with two classes: red PNGs (colour) and grey JPEGs (greyscale), 3 each.
fn image_folder(root: &Path) {
    for (class, n) in [("cat", 3), ("dog", 3)] {
        std::fs::create_dir_all(root.join(class)).expect("mkdir");
        for i in 0..n {
            let (w, h) = (20 + i as u32 * 3, 16 + i as u32);
            if class == "cat" {
                let img =
                    image::RgbImage::from_fn(w, h, |x, _| image::Rgb([200, (x * 5) as u8, 10]));
                img.save(root.join(class).join(format!("{i}.png")))
                    .expect("png");
            } else {
                let img =
                    image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x + y) * 4) as u8]));
                img.save(root.join(class).join(format!("{i}.JPG")))
                    .expect("jpeg");
            }
        }
    }
    std::fs::write(root.join("cat").join("notes.txt"), "not an image").expect("write");
}

#[test]
fn image_folder_loads_colour_and_greyscale() {
    let dir = tempfile::tempdir().expect("tempdir");
    image_folder(dir.path());
    let src = ImageFolder::open(dir.path()).expect("opens");
    assert_eq!(src.len(), 6);
    assert_eq!(src.class_names(), vec!["cat", "dog"]);
    let cat = src.get(0).expect("png");
    assert_eq!((cat.label, cat.image.width, cat.image.height), (0, 20, 16));
    assert_eq!(&cat.image.pixels[..3], &[200, 0, 10]);
    let dog = src.get(4).expect("jpeg");
    assert_eq!(dog.label, 1);
    let p = &dog.image.pixels;
    assert!(
        p.chunks(3).all(|c| c[0] == c[1] && c[1] == c[2]),
        "greyscale becomes equal RGB"
    );
    assert!(
        ImageFolder::open(&dir.path().join("cat")).is_err(),
        "no class folders"
    );
}

#[test]
fn prepare_writes_shards_and_a_manifest_that_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    image_folder(&dir.path().join("in"));
    let out = dir.path().join("shards");
    let p = prepare(&dir.path().join("in"), &out, 4, 0).expect("prepare");
    assert_eq!(p.manifest.samples, 6);
    assert_eq!(p.manifest.shards.len(), 2);
    Manifest::load(&p.manifest_path)
        .expect("loads")
        .verify(&out)
        .expect("verifies");
    let ds = WebDataset::open(&p.manifest_path.to_string_lossy()).expect("opens");
    assert_eq!(ds.len(), 6);
    assert_eq!(ds.class_names(), vec!["cat", "dog"]);
    let mut labels: Vec<i64> = (0..6).map(|i| ds.get(i).expect("decodes").label).collect();
    labels.sort();
    assert_eq!(labels, vec![0, 0, 0, 1, 1, 1]);
    // Also by folder and by brace pattern.
    assert_eq!(
        WebDataset::open(&out.to_string_lossy())
            .expect("folder")
            .len(),
        6
    );
    let pattern = format!("{}/shard-{{000000..000001}}.tar", out.display());
    assert_eq!(WebDataset::open(&pattern).expect("pattern").len(), 6);
    // A damaged shard fails the manifest check, naming the shard.
    let shard = out.join("shard-000001.tar");
    let mut bytes = std::fs::read(&shard).expect("read");
    let n = bytes.len();
    bytes[n / 3] ^= 0xFF;
    std::fs::write(&shard, bytes).expect("write");
    let err = WebDataset::open(&p.manifest_path.to_string_lossy())
        .expect_err("damaged")
        .to_string();
    assert!(err.contains("shard-000001.tar"), "{err}");
}

/// Sets `path`'s modification time an hour back (older than any racy window).
fn backdate(path: &Path) -> std::time::SystemTime {
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .expect("set mtime");
    t
}

#[test]
fn verified_shards_are_not_hashed_again_and_changed_ones_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    image_folder(&dir.path().join("in"));
    let out = dir.path().join("shards");
    let p = prepare(&dir.path().join("in"), &out, 4, 0).expect("prepare");
    let cache = dir.path().join("cache/verified.json");
    let m = Manifest::load(&p.manifest_path).expect("loads");
    let shard = out.join("shard-000000.tar");
    let old = backdate(&shard);
    backdate(&out.join("shard-000001.tar"));
    m.verify_with(&out, Some(&cache)).expect("verifies");
    assert!(cache.exists(), "the verified cache is written");
    // Other bytes of the same size under the same modification time: the cache vouches for
    // the shard, which is not read again (a full verify sees the change).
    let mut bytes = std::fs::read(&shard).expect("read");
    let n = bytes.len();
    bytes[n / 3] ^= 0xFF;
    std::fs::write(&shard, &bytes).expect("write");
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .and_then(|f| f.set_modified(old))
        .expect("set mtime");
    m.verify_with(&out, Some(&cache))
        .expect("trusted from the cache");
    assert!(m.verify(&out).is_err(), "a full check reads the shard");
    // A change that moves the modification time is hashed again and refused.
    std::fs::write(&shard, &bytes).expect("write");
    let err = m
        .verify_with(&out, Some(&cache))
        .expect_err("changed")
        .to_string();
    assert!(err.contains("shard-000000.tar"), "{err}");
}

#[test]
fn a_manifest_opens_without_reading_shards_and_a_wrong_count_names_the_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    image_folder(&dir.path().join("in"));
    let out = dir.path().join("shards");
    let p = prepare(&dir.path().join("in"), &out, 4, 0).expect("prepare");
    // The manifest claims one sample more in the second shard than it holds.
    let mut m = Manifest::load(&p.manifest_path).expect("loads");
    m.shards[1].samples += 1;
    m.samples += 1;
    std::fs::write(&p.manifest_path, serde_json::to_vec(&m).expect("json")).expect("write");
    let ds = WebDataset::open(&p.manifest_path.to_string_lossy()).expect("opens");
    assert_eq!(ds.len(), 7, "the counts come from the manifest");
    assert!(ds.get(0).is_ok(), "the first shard is read when wanted");
    let err = ds.get(5).expect_err("the second shard's count is wrong");
    assert!(
        err.origin.contains("shard-000001.tar") && err.reason.contains("the manifest says 3"),
        "{err:?}"
    );
}

fn tar_append(tar: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, name, bytes).expect("append");
}

#[test]
fn corrupt_image_in_a_shard_is_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shard = dir.path().join("s.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&shard).expect("create"));
    let mut png = Vec::new();
    image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encode");
    for i in 0..6 {
        let bytes: &[u8] = if i == 2 {
            b"\x89PNG\r\n\x1a\nthis is not really a png"
        } else {
            &png
        };
        tar_append(&mut tar, &format!("{i:04}.png"), bytes);
        tar_append(
            &mut tar,
            &format!("{i:04}.cls"),
            (i % 2).to_string().as_bytes(),
        );
    }
    tar_append(&mut tar, "0006.cls", b"1"); // a label without an image
    tar.finish().expect("finish");
    drop(tar);
    let src: Arc<dyn Source> = Arc::new(WebDataset::open(&shard.to_string_lossy()).expect("opens"));
    assert_eq!(src.len(), 7);
    let transform = Transform::new(8, AugmentConfig::default());
    let plan = Plan::chunked((0..7).collect(), 3, true, 0, 0);
    let (mut good, mut skipped, mut reasons) = (0, 0, Vec::new());
    for batch in Loader::start(src, transform, plan, 2, 2) {
        let batch = batch.expect("no loader thread dies");
        good += batch.len();
        skipped += batch.errors.len();
        reasons.extend(batch.errors.iter().map(|e| e.to_string()));
        assert_eq!(batch.images.size()[0] as usize, batch.len());
    }
    assert_eq!((good, skipped), (5, 2), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("0002")), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("0006") && r.contains("no .jpg/.png")),
        "{reasons:?}"
    );
}

#[test]
fn cifar10_binary_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = Vec::new();
    for label in [3u8, 7] {
        bytes.push(label);
        bytes.extend(std::iter::repeat_n(10u8, 1024)); // R
        bytes.extend(std::iter::repeat_n(20u8, 1024)); // G
        bytes.extend(std::iter::repeat_n(30u8, 1024)); // B
    }
    std::fs::write(dir.path().join("test_batch.bin"), &bytes).expect("write");
    let src = Cifar10::open(dir.path(), SplitKind::Val).expect("opens");
    assert_eq!(src.len(), 2);
    let s = src.get(1).expect("sample");
    assert_eq!((s.label, s.image.width), (7, 32));
    assert_eq!(&s.image.pixels[..3], &[10, 20, 30]);
    std::fs::write(dir.path().join("test_batch.bin"), &bytes[..100]).expect("write");
    let err = Cifar10::open(dir.path(), SplitKind::Val)
        .expect_err("truncated")
        .to_string();
    assert!(err.contains("3073-byte"), "{err}");
    assert!(
        Cifar10::open(dir.path(), SplitKind::Train)
            .expect_err("missing")
            .to_string()
            .contains("data_batch_1.bin")
    );
}

#[test]
fn mnist_idx_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
    images.extend((0..2 * 784).map(|i| (i % 251) as u8));
    let labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 5, 9];
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), &images).expect("write");
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), &labels).expect("write");
    let src = Mnist::open(dir.path(), SplitKind::Val).expect("opens");
    assert_eq!(src.len(), 2);
    let s = src.get(1).expect("sample");
    assert_eq!((s.label, s.image.width, s.image.height), (9, 28, 28));
    assert_eq!(&s.image.pixels[..3], &[(784 % 251) as u8; 3]);
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), &labels[..9]).expect("write");
    assert!(
        Mnist::open(dir.path(), SplitKind::Val)
            .expect_err("short")
            .to_string()
            .contains("labels")
    );
}

/// Softmax regression on raw pixels: if this reached high accuracy, the dataset would not test
/// what an attention network learns.
#[test]
fn builtin_is_not_linearly_separable_on_pixels() {
    let size = 32;
    let (n_train, n_val) = (4000usize, 1000usize);
    let transform = Transform::new(
        size,
        AugmentConfig {
            eval_crop: 1.0,
            ..AugmentConfig::default()
        },
    );
    let load = |split, n: usize| {
        let src = Builtin::new(n, size, 0, split);
        let mut pixels = vec![0f32; n * transform.len()];
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let s = src.get(i).expect("sample");
            transform.eval(
                &s.image,
                &mut pixels[i * transform.len()..(i + 1) * transform.len()],
            );
            labels.push(s.label);
        }
        (
            Tensor::from_slice(&pixels).view([n as i64, -1]),
            Tensor::from_slice(&labels),
        )
    };
    let (xt, yt) = load(SplitKind::Train, n_train);
    let (xv, yv) = load(SplitKind::Val, n_val);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let linear = nn::linear(vs.root(), 3 * 32 * 32, 10, Default::default());
    let mut opt = nn::Adam::default().build(&vs, 1e-3).expect("adam");
    let accuracy = |x: &Tensor, y: &Tensor| {
        tch::no_grad(|| {
            x.apply(&linear)
                .argmax(-1, false)
                .eq_tensor(y)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        })
    };
    for _epoch in 0..30 {
        for b in 0..(n_train as i64 / 100) {
            let x = xt.narrow(0, b * 100, 100);
            let y = yt.narrow(0, b * 100, 100);
            let loss = x.apply(&linear).cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
        }
    }
    let (train_acc, val_acc) = (accuracy(&xt, &yt), accuracy(&xv, &yv));
    println!(
        "linear classifier on pixels: train {:.1}%, val {:.1}%",
        100.0 * train_acc,
        100.0 * val_acc
    );
    assert!(
        val_acc < 0.4,
        "a linear model reaches {val_acc} on the builtin data: too easy"
    );
}

/// Mean number of distinct labels per batch of `batch` over the first `batches` batches of
/// epoch 0, read through the sources themselves (labels as the loader sees them).
fn distinct_labels_per_batch(
    source: &dyn Source,
    data: &axial_common::job::DataConfig,
    batch: u64,
    batches: u64,
) -> f64 {
    let layout = axial_worker::data::layout(source, data);
    let plan = axial_common::plan::EpochPlan::new(&layout, 7, 0);
    let mut total = 0;
    for b in 0..batches {
        let mut labels: Vec<i64> = plan
            .samples(b * batch, (b + 1) * batch)
            .iter()
            .map(|&i| source.get(i as usize).expect("sample").label)
            .collect();
        labels.sort();
        labels.dedup();
        total += labels.len();
    }
    total as f64 / batches as f64
}

fn data_config(format: &str, path: &Path, extra: &str) -> axial_common::job::DataConfig {
    let text = format!(
        "format = \"{format}\"\ntrain = \"{}\"\nval = \"{}\"\n{extra}",
        path.display(),
        path.display()
    );
    toml::from_str(&text).expect("data config")
}

/// Real data sets are stored class by class. Batches drawn from a class-sorted image folder,
/// and from tar shards that each hold one class, must mix the classes about as a uniform
/// shuffle does (10 classes, batches of 32: 9.66 distinct labels expected). The order that
/// once kept runs of 1,000 neighbouring samples together gave 1 or 2 here.
#[test]
fn class_sorted_sources_give_mixed_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (classes, per_class, batch) = (10usize, 120usize, 32u64);
    let uniform = 10.0 * (1.0 - 0.9f64.powi(batch as i32));
    let mut png = Vec::new();
    image::GrayImage::from_pixel(4, 4, image::Luma([9]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encode");
    // An image folder: class 0's files, then class 1's, ...
    let folder = dir.path().join("folder");
    for c in 0..classes {
        let d = folder.join(format!("class{c:02}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        for i in 0..per_class {
            std::fs::write(d.join(format!("{i:04}.png")), &png).expect("write");
        }
    }
    let source = ImageFolder::open(&folder).expect("open");
    let config = data_config("imagefolder", &folder, "");
    let d = distinct_labels_per_batch(&source, &config, batch, 30);
    assert!(d > 0.95 * uniform, "image folder: {d} of {uniform}");
    // Tar shards, one class each.
    let shards = dir.path().join("shards");
    std::fs::create_dir_all(&shards).expect("mkdir");
    for c in 0..classes {
        let file = std::fs::File::create(shards.join(format!("class-{c:02}.tar"))).expect("tar");
        let mut tar = tar::Builder::new(file);
        for i in 0..per_class {
            tar_append(&mut tar, &format!("{c:02}{i:04}.png"), &png);
            tar_append(
                &mut tar,
                &format!("{c:02}{i:04}.cls"),
                c.to_string().as_bytes(),
            );
        }
        tar.finish().expect("finish");
    }
    let source = WebDataset::open(&shards.to_string_lossy()).expect("open");
    // The default window (16 shards) holds every class open.
    let d = distinct_labels_per_batch(&source, &data_config("webdataset", &shards, ""), batch, 30);
    assert!(
        d > 0.9 * uniform,
        "tar shards, default window: {d} of {uniform}"
    );
    // A window of 4 shards mixes at least the 4 classes it holds.
    let d = distinct_labels_per_batch(
        &source,
        &data_config(
            "webdataset",
            &shards,
            "shard_window = 4\nshuffle_buffer = 64\n",
        ),
        batch,
        30,
    );
    let of_four = 4.0 * (1.0 - 0.75f64.powi(batch as i32));
    assert!(d > 0.95 * of_four, "tar shards, window 4: {d} of {of_four}");
    // Without a window or buffer the shards stay one class each: the check can fail.
    let d = distinct_labels_per_batch(
        &source,
        &data_config(
            "webdataset",
            &shards,
            "shard_window = 1\nshuffle_buffer = 0\n",
        ),
        batch,
        30,
    );
    assert!(d < 1.5, "unmixed shards: {d}");
}

/// A source whose sample 13 makes its loader thread panic.
struct Exploding;

impl Source for Exploding {
    fn len(&self) -> usize {
        40
    }
    fn num_classes(&self) -> i64 {
        2
    }
    fn get(
        &self,
        index: usize,
    ) -> Result<axial_worker::data::Sample, axial_worker::data::SampleError> {
        assert!(index != 13, "sample 13 exploded");
        Ok(axial_worker::data::Sample {
            image: axial_worker::data::Image::new(4, 4),
            label: (index % 2) as i64,
        })
    }
}

/// A loader thread that dies is an error that says why, not a quiet end of the epoch (which
/// would let the ledger count the samples it never made as trained on).
#[test]
fn a_dying_loader_thread_is_an_error_not_the_end_of_the_epoch() {
    let plan = Plan::chunked((0..40).collect(), 8, false, 0, 0);
    let transform = Transform::new(8, AugmentConfig::default());
    let mut made = 0;
    let mut error = None;
    for batch in Loader::start(Arc::new(Exploding), transform, plan, 2, 2) {
        match batch {
            Ok(_) => made += 1,
            Err(e) => error = Some(e),
        }
    }
    let error = error.expect("the dead thread is reported");
    println!("after {made} batches: {error}");
    assert_eq!(error.batch, 1, "batch 1 holds sample 13");
    assert!(error.reason.contains("sample 13 exploded"), "{error}");
    assert_eq!(made, 1);
}
