//! `vmr completions <shell>`.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::error::CliResult;

/// Arguments of `vmr completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to print a completion script for.
    pub shell: Shell,
}

/// Prints the completion script on stdout.
pub fn run(a: &CompletionsArgs) -> CliResult {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "vmr", &mut std::io::stdout());
    Ok(())
}
