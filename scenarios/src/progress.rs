//! The terminal progress bar: requests replayed out of the total, with the running hit ratio.
//! Drawn on stderr only when it is a terminal, so CI logs and pipes stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of a whole scenario (every run of a capacity sweep).
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total` requests; hidden when `quiet`.
    pub fn new(total: u64, quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        };
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({per_sec}) {msg}",
        ) {
            bar.set_style(style);
        }
        Self { bar }
    }

    /// Names the run in progress.
    pub fn run(&self, label: String) {
        self.bar.set_prefix(label);
    }

    /// One request done; `hit_ratio` so far in this run.
    pub fn request(&self, hit_ratio: f64) {
        self.bar.inc(1);
        self.bar
            .set_message(format!("hit {:.1}%", hit_ratio * 100.0));
    }

    /// A line above the bar (faults as they happen).
    pub fn note(&self, line: String) {
        self.bar.println(line);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
