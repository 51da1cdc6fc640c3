//! The progress bar of a run (or plain lines when stderr is not a terminal).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Progress {
    pub(crate) bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    pub(crate) fn new(total: u64, done: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(done);
            bar
        });
        Self { bar, quiet }
    }

    pub(crate) fn step(&self, step: u64, message: Option<String>) {
        match (&self.bar, message) {
            (Some(bar), m) => {
                bar.set_position(step);
                if let Some(m) = m {
                    bar.set_message(m);
                }
            }
            (None, Some(m)) if !self.quiet => eprintln!("step {step}  {m}"),
            _ => {}
        }
    }

    pub(crate) fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if !self.quiet => eprintln!("{text}"),
            None => {}
        }
    }

    /// A line every rank prints, quiet or not (events an operator checks on each rank).
    pub(crate) fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}
