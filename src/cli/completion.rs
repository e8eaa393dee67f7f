//! `ferro completion bash|zsh|fish`: print a shell completion script for every verb and
//! flag, generated from the same definitions the parser uses, so it cannot drift.

use clap_complete::Shell;

/// Arguments of `ferro completion`.
#[derive(clap::Args, Debug)]
pub struct CompletionArgs {
    /// The shell: bash, zsh, fish (also elvish, powershell).
    pub shell: Shell,
}

/// Writes the completion script of `command` (the whole `ferro` CLI) to stdout.
pub fn run(mut command: clap::Command, args: CompletionArgs) -> anyhow::Result<()> {
    let name = command.get_name().to_owned();
    clap_complete::generate(args.shell, &mut command, name, &mut std::io::stdout());
    Ok(())
}
