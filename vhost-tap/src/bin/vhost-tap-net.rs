//! `vhost-tap-net`: a vhost-user net backend over a TAP device that records
//! every frame. See docs/vhost-tap.md.

use clap::Parser;

/// vhost-user net backend with a capture tee and a replay mode.
#[derive(Parser)]
#[command(
    version,
    about = "vhost-user net backend over a TAP device with a capture tee and a replay mode"
)]
struct Cli {
    #[command(flatten)]
    args: vhost_tap::app::NetArgs,
}

fn main() -> anyhow::Result<()> {
    vhost_tap::app::init_logging();
    let cli = Cli::parse();
    vhost_tap::app::run_net(cli.args)?;
    Ok(())
}
