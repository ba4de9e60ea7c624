//! `vmr`: the vmreplay command line. Parses arguments and hands them to the
//! library; the exit code comes from the library's error kinds.

use clap::Parser;

fn main() {
    let cli = vmr::Cli::parse();
    std::process::exit(vmr::run(cli));
}
