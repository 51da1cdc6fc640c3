//! The built-in procedural dataset: ten classes of shapes and textures drawn at any size,
//! deterministic by `(seed, split, index)`, no download.
//!
//! | class | what |
//! |---|---|
//! | 0 disk | 1 ring | 2 filled square | 3 square outline | 4 triangle |
//! | 5 plus | 6 diagonal cross | 7 horizontal stripes | 8 vertical stripes | 9 checkerboard |
//!
//! Each image has a random two-colour gradient background, a foreground of random colour (kept
//! apart from the background in brightness), a random position, size and small rotation, a few
//! distractor dots and pixel noise. The class is a matter of shape and texture, never of colour
//! or place, so a linear classifier on the pixels does poorly (see the data tests) while a
//! convolutional or attention network learns it.

use axial_common::Rng;

use super::{Image, Sample, SampleError, Source, SplitKind};

pub const CLASS_NAMES: [&str; 10] = [
    "disk",
    "ring",
    "square",
    "square-outline",
    "triangle",
    "plus",
    "cross",
    "h-stripes",
    "v-stripes",
    "checkerboard",
];

#[derive(Debug, Clone)]
pub struct Builtin {
    len: usize,
    size: u32,
    seed: u64,
    split: u64,
}

impl Builtin {
    pub fn new(len: usize, size: u32, seed: u64, split: SplitKind) -> Self {
        Self {
            len,
            size,
            seed,
            split: match split {
                SplitKind::Train => 1,
                SplitKind::Val => 2,
            },
        }
    }
}

fn luminance(c: [f64; 3]) -> f64 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

fn colour(rng: &mut Rng) -> [f64; 3] {
    [
        rng.uniform(0.0, 255.0),
        rng.uniform(0.0, 255.0),
        rng.uniform(0.0, 255.0),
    ]
}

/// Whether the point (u, v), in the shape's own frame scaled so that its radius is 1, is on
/// the shape of `class`.
fn inside(class: i64, u: f64, v: f64, period: f64) -> bool {
    let d = (u * u + v * v).sqrt();
    match class {
        0 => d < 1.0,
        1 => (0.6..1.0).contains(&d),
        2 => u.abs() < 0.8 && v.abs() < 0.8,
        3 => {
            let m = u.abs().max(v.abs());
            (0.52..0.8).contains(&m)
        }
        4 => {
            // Upright triangle with apex at v = -1 and base at v = 0.8.
            (-1.0..0.8).contains(&v) && u.abs() < (v + 1.0) / 1.8 * 0.95
        }
        5 => (u.abs() < 0.22 && v.abs() < 1.0) || (v.abs() < 0.22 && u.abs() < 1.0),
        6 => {
            let (a, b) = (
                (u + v) * std::f64::consts::FRAC_1_SQRT_2,
                (u - v) * std::f64::consts::FRAC_1_SQRT_2,
            );
            (a.abs() < 0.22 && b.abs() < 1.0) || (b.abs() < 0.22 && a.abs() < 1.0)
        }
        7 => d < 1.0 && (v / period).rem_euclid(2.0) < 1.0,
        8 => d < 1.0 && (u / period).rem_euclid(2.0) < 1.0,
        _ => {
            u.abs() < 0.8
                && v.abs() < 0.8
                && ((u / period).floor() + (v / period).floor()).rem_euclid(2.0) < 1.0
        }
    }
}

/// Draws sample `index` of a split at `size` x `size`.
pub fn render(seed: u64, split: u64, index: usize, size: u32) -> Sample {
    let mut rng = Rng::derive(seed, &[0xB17_u64, split, index as u64]);
    let label = rng.below(10) as i64;
    let s = size as f64;
    let bg0 = colour(&mut rng);
    let bg1 = colour(&mut rng);
    let bg_lum = luminance([
        (bg0[0] + bg1[0]) / 2.0,
        (bg0[1] + bg1[1]) / 2.0,
        (bg0[2] + bg1[2]) / 2.0,
    ]);
    let mut fg = colour(&mut rng);
    for _ in 0..16 {
        if (luminance(fg) - bg_lum).abs() > 70.0 {
            break;
        }
        fg = colour(&mut rng);
    }
    let angle = rng.uniform(0.0, std::f64::consts::TAU);
    let (gx, gy) = (angle.cos(), angle.sin());
    let radius = rng.uniform(0.24, 0.4) * s;
    let cx = rng.uniform(radius, s - radius);
    let cy = rng.uniform(radius, s - radius);
    // Small rotations only: larger ones would turn a plus into a cross, stripes into stripes.
    let theta = rng.uniform(-0.25, 0.25)
        + if label == 2 || label == 3 || label == 9 {
            rng.uniform(0.0, 0.5)
        } else {
            0.0
        };
    let (ct, st) = (theta.cos(), theta.sin());
    // Stripe and check width: at least ~2 pixels at 32 px.
    let period = rng.uniform(0.07, 0.1) * s / radius;
    let dots: Vec<(f64, f64, f64, [f64; 3])> = (0..rng.below(4))
        .map(|_| {
            (
                rng.uniform(0.0, s),
                rng.uniform(0.0, s),
                rng.uniform(0.03, 0.07) * s,
                colour(&mut rng),
            )
        })
        .collect();
    let noise = rng.uniform(4.0, 24.0);
    let mut image = Image::new(size, size);
    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            let t = ((px / s - 0.5) * gx + (py / s - 0.5) * gy + 0.5).clamp(0.0, 1.0);
            let mut c: [f64; 3] = std::array::from_fn(|k| bg0[k] * (1.0 - t) + bg1[k] * t);
            for (dx, dy, dr, dc) in &dots {
                if (px - dx).powi(2) + (py - dy).powi(2) < dr * dr {
                    c = *dc;
                }
            }
            let (du, dv) = ((px - cx) / radius, (py - cy) / radius);
            let (u, v) = (du * ct + dv * st, -du * st + dv * ct);
            if inside(label, u, v, period) {
                c = fg;
            }
            let i = (y as usize * size as usize + x as usize) * 3;
            for (out, value) in image.pixels[i..i + 3].iter_mut().zip(c) {
                let n = rng.uniform(-noise, noise);
                *out = (value + n).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Sample { image, label }
}

impl Source for Builtin {
    fn len(&self) -> usize {
        self.len
    }

    fn num_classes(&self) -> i64 {
        10
    }

    fn get(&self, index: usize) -> Result<Sample, SampleError> {
        if index >= self.len {
            return Err(SampleError {
                index,
                origin: "builtin".into(),
                reason: format!("index out of range (len {})", self.len),
            });
        }
        Ok(render(self.seed, self.split, index, self.size))
    }

    fn class_names(&self) -> Vec<String> {
        CLASS_NAMES.iter().map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_split_apart() {
        let a = Builtin::new(200, 32, 7, SplitKind::Train);
        let s1 = a.get(5).expect("sample");
        let s2 = a.get(5).expect("sample");
        assert_eq!(s1.image, s2.image);
        assert_eq!(s1.label, s2.label);
        let v = Builtin::new(200, 32, 7, SplitKind::Val);
        assert_ne!(v.get(5).expect("sample").image, s1.image);
        let mut counts = [0; 10];
        for i in 0..200 {
            counts[a.get(i).expect("sample").label as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c >= 8), "{counts:?}");
        assert_eq!(
            Builtin::new(3, 57, 1, SplitKind::Train)
                .get(2)
                .expect("any size")
                .image
                .width,
            57
        );
    }
}
