//! Learning rate per step: linear warmup, then cosine (to `min_lr`), step decay or constant.
//! Like the authors' recipe it is evaluated every step, from the fractional epoch — here the
//! share of the epoch's samples consumed, so the schedule is the same whatever the number of
//! workers (and across a resume on another number).

use axial_common::JobConfig;
use axial_common::job::ScheduleName;

#[derive(Debug, Clone)]
pub struct Schedule {
    name: ScheduleName,
    peak: f64,
    min_lr: f64,
    warmup_epochs: f64,
    epochs: f64,
    milestones: Vec<u64>,
    gamma: f64,
}

impl Schedule {
    pub fn new(job: &JobConfig, peak: f64) -> Self {
        Self {
            name: job.schedule.name,
            peak,
            min_lr: job.schedule.min_lr,
            warmup_epochs: job.warmup_epochs(),
            epochs: job.train.epochs as f64,
            milestones: job.schedule.milestones.clone(),
            gamma: job.schedule.gamma,
        }
    }

    /// Rate for a step that starts at fractional epoch `before` and ends at `after`.
    pub fn lr(&self, before: f64, after: f64) -> f64 {
        // The recipe's warmup reaches the peak at the end of the step: (it + 1) / N.
        if after <= self.warmup_epochs && self.warmup_epochs > 0.0 {
            return self.peak * after / self.warmup_epochs;
        }
        match self.name {
            ScheduleName::Constant => self.peak,
            ScheduleName::Step => {
                let e = before.floor() as u64;
                let drops = self.milestones.iter().filter(|m| e >= **m).count() as i32;
                self.peak * self.gamma.powi(drops)
            }
            ScheduleName::Cosine => {
                let len = (self.epochs - self.warmup_epochs).max(1e-9);
                let frac = ((before - self.warmup_epochs) / len).clamp(0.0, 1.0);
                self.min_lr
                    + (self.peak - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axial_common::JobConfig;

    fn job(extra: &str) -> JobConfig {
        let text = format!(
            "[model]\narch = \"axial26s\"\nnum_classes = 10\n[data]\nformat = \"builtin\"\ntrain = 100\nval = 10\nimage_size = 32\n[train]\nepochs = 13\n{extra}"
        );
        JobConfig::parse(&text, "t", std::path::Path::new(".")).expect("valid")
    }

    /// Step i of 10 per epoch spans [i/10, (i+1)/10).
    fn lr_at(s: &Schedule, i: u64) -> f64 {
        s.lr(i as f64 / 10.0, (i + 1) as f64 / 10.0)
    }

    #[test]
    fn warmup_then_cosine_to_zero() {
        let s = Schedule::new(&job(""), 0.1);
        // 13 epochs -> 1 warmup epoch (10/130 of the run).
        assert!((lr_at(&s, 0) - 0.01).abs() < 1e-12);
        assert!((lr_at(&s, 9) - 0.1).abs() < 1e-12);
        assert!((lr_at(&s, 10) - 0.1).abs() < 1e-12);
        assert!(lr_at(&s, 70) < 0.1 && lr_at(&s, 70) > 0.0);
        assert!(lr_at(&s, 129) < 1e-4);
        let lrs: Vec<f64> = (10..130).map(|i| lr_at(&s, i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn step_decay_at_milestones() {
        let s = Schedule::new(
            &job("[schedule]\nname = \"step\"\nmilestones = [5, 10]\nwarmup_epochs = 0.0\n"),
            0.1,
        );
        assert!((lr_at(&s, 49) - 0.1).abs() < 1e-12);
        assert!((lr_at(&s, 50) - 0.01).abs() < 1e-12);
        assert!((lr_at(&s, 100) - 0.001).abs() < 1e-12);
    }
}
