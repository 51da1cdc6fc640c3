//! Image transforms, from 8-bit RGB to the normalized float `[3, S, S]` the model takes.
//!
//! - training: RandomResizedCrop (torchvision's sampling: area fraction uniform in `scale`,
//!   log-aspect uniform in `ratio`, ten tries, then a centre crop), horizontal flip with
//!   probability 1/2, normalization;
//! - evaluation: resize the shorter side to `S / crop` and take the centre `S x S`.
//!
//! Both are one bilinear resampling of a source rectangle, done in place into the batch buffer.

use axial_common::Rng;
use axial_common::job::AugmentConfig;

use super::Image;

/// A source rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

#[derive(Debug, Clone)]
pub struct Transform {
    pub size: u32,
    pub augment: AugmentConfig,
}

impl Transform {
    pub fn new(size: u32, augment: AugmentConfig) -> Self {
        Self { size, augment }
    }

    /// Floats per transformed image.
    pub fn len(&self) -> usize {
        3 * self.size as usize * self.size as usize
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Training transform of `img` into `out` (`[3, S, S]`), drawing from `rng`.
    pub fn train(&self, img: &Image, rng: &mut Rng, out: &mut [f32]) {
        let rect = random_resized_crop(img, self.augment.crop_scale, self.augment.crop_ratio, rng);
        let flip = self.augment.hflip && rng.bernoulli(0.5);
        self.resample(img, rect, flip, out);
    }

    /// Evaluation transform of `img` into `out`.
    pub fn eval(&self, img: &Image, out: &mut [f32]) {
        let short = img.width.min(img.height) as f64;
        // Resize the shorter side to S / crop, then take S x S: in source pixels that is a
        // centred square of side short * crop.
        let side = short * self.augment.eval_crop;
        let rect = Rect {
            x: (img.width as f64 - side) / 2.0,
            y: (img.height as f64 - side) / 2.0,
            w: side,
            h: side,
        };
        self.resample(img, rect, false, out);
    }

    fn resample(&self, img: &Image, r: Rect, flip: bool, out: &mut [f32]) {
        let s = self.size as usize;
        let (w, h) = (img.width as usize, img.height as usize);
        let mean = self.augment.mean;
        let inv_std = self.augment.std.map(|x| 1.0 / x);
        let coords =
            |n: usize, start: f64, extent: f64, limit: usize| -> Vec<(usize, usize, f32)> {
                (0..n)
                    .map(|o| {
                        let src = (start + (o as f64 + 0.5) * extent / n as f64 - 0.5)
                            .clamp(0.0, (limit - 1) as f64);
                        let lo = src.floor() as usize;
                        let hi = (lo + 1).min(limit - 1);
                        (lo, hi, (src - lo as f64) as f32)
                    })
                    .collect()
            };
        let xs = coords(s, r.x, r.w, w);
        let ys = coords(s, r.y, r.h, h);
        let px = |x: usize, y: usize, c: usize| img.pixels[(y * w + x) * 3 + c] as f32;
        for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
            for ox in 0..s {
                let (x0, x1, fx) = xs[if flip { s - 1 - ox } else { ox }];
                for c in 0..3 {
                    let top = px(x0, y0, c) * (1.0 - fx) + px(x1, y0, c) * fx;
                    let bottom = px(x0, y1, c) * (1.0 - fx) + px(x1, y1, c) * fx;
                    let v = (top * (1.0 - fy) + bottom * fy) / 255.0;
                    out[(c * s + oy) * s + ox] = ((v as f64 - mean[c]) * inv_std[c]) as f32;
                }
            }
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params`.
pub fn random_resized_crop(img: &Image, scale: [f64; 2], ratio: [f64; 2], rng: &mut Rng) -> Rect {
    let (w, h) = (img.width as f64, img.height as f64);
    let area = w * h;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale[0], scale[1]);
        let aspect = rng.uniform(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            let y = rng.below((h - ch) as u64 + 1) as f64;
            let x = rng.below((w - cw) as u64 + 1) as f64;
            return Rect { x, y, w: cw, h: ch };
        }
    }
    let in_ratio = w / h;
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, (w / ratio[0]).round())
    } else if in_ratio > ratio[1] {
        ((h * ratio[1]).round(), h)
    } else {
        (w, h)
    };
    Rect {
        x: ((w - cw) / 2.0).floor(),
        y: ((h - ch) / 2.0).floor(),
        w: cw,
        h: ch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> AugmentConfig {
        AugmentConfig {
            mean: [0.0; 3],
            std: [1.0; 3],
            eval_crop: 1.0,
            ..AugmentConfig::default()
        }
    }

    #[test]
    fn identity_resample_keeps_pixels() {
        let mut img = Image::new(4, 3);
        for (i, p) in img.pixels.iter_mut().enumerate() {
            *p = (i * 7 % 256) as u8;
        }
        let t = Transform::new(3, plain());
        let mut out = vec![0.0; t.len()];
        // Centre 3x3 of a 4x3 image: columns 0.5..3.5.
        t.eval(&img, &mut out);
        let square = Image {
            width: 3,
            height: 3,
            pixels: img.pixels[..27].to_vec(),
        };
        t.eval(&square, &mut out);
        for y in 0..3 {
            for x in 0..3 {
                for c in 0..3 {
                    let want = square.pixels[(y * 3 + x) * 3 + c] as f32 / 255.0;
                    assert!((out[(c * 3 + y) * 3 + x] - want).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn crops_stay_inside_and_follow_the_scale() {
        let img = Image::new(100, 60);
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            let r = random_resized_crop(&img, [0.25, 0.5], [0.75, 1.333], &mut rng);
            assert!(
                r.x >= 0.0 && r.y >= 0.0 && r.x + r.w <= 100.0 && r.y + r.h <= 60.0,
                "{r:?}"
            );
            let frac = r.w * r.h / 6000.0;
            assert!((0.2..=0.56).contains(&frac), "{frac}");
        }
    }
}
