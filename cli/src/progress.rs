//! Progress bars (indicatif) on stderr: drawn only when stderr is a
//! terminal and neither `--quiet` nor `--json` is given, so scripts and pipes
//! see none.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::Out;

/// Whether bars are drawn for `out`.
pub fn enabled(out: &Out) -> bool {
    !out.quiet && !out.json && std::io::stderr().is_terminal()
}

/// A bar of `len` units (`None`: a spinner), hidden when not [`enabled`].
pub fn bar(out: &Out, len: Option<u64>, bytes: bool) -> ProgressBar {
    let pb = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    if !enabled(out) {
        pb.set_draw_target(ProgressDrawTarget::hidden());
        return pb;
    }
    pb.set_draw_target(ProgressDrawTarget::stderr());
    let tmpl = match (len.is_some(), bytes) {
        (true, true) => {
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        }
        (true, false) => "{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}",
        (false, _) => "{spinner} {msg} {elapsed}",
    };
    pb.set_style(
        ProgressStyle::with_template(tmpl)
            .expect("the templates are valid")
            .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}
