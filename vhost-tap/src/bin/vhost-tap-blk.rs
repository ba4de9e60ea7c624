//! `vhost-tap-blk`: a vhost-user block backend that records every request.
//! See docs/vhost-tap.md.

use clap::Parser;

/// vhost-user block backend with a capture tee and a replay mode.
#[derive(Parser)]
#[command(
    version,
    about = "vhost-user block backend with a capture tee and a replay mode"
)]
struct Cli {
    #[command(flatten)]
    args: vhost_tap::app::BlkArgs,
}

fn main() -> anyhow::Result<()> {
    vhost_tap::app::init_logging();
    let cli = Cli::parse();
    vhost_tap::app::run_blk(cli.args)?;
    Ok(())
}
