//! metaldctl: the operator's command line for metald. It speaks metald's
//! API with the generated Connect client, prints tables or the API's JSON,
//! and reports any failure as one line, `metaldctl: <code>: <message>`,
//! with exit status 1 (2 for a command line that does not parse).

mod args;
mod client;
mod config;
mod console;
mod create;
mod error;
mod health;
mod list;
mod output;
mod table;
mod vm;

use std::io::Write;

use clap::{CommandFactory, Parser};

use crate::args::{Cli, Command};
use crate::client::Api;
use crate::error::CliError;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_exit(e),
    };
    if let Command::Completions(c) = &cli.command {
        let mut out = std::io::stdout().lock();
        clap_complete::generate(c.shell, &mut Cli::command(), "metaldctl", &mut out);
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => fail(&CliError::new("internal", format!("runtime: {e}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(out.as_bytes());
            let _ = stdout.flush();
        }
        Err(e) => fail(&e),
    }
}

/// Runs the command; what it prints on success is returned.
async fn run(cli: Cli) -> Result<String, CliError> {
    let settings = config::resolve(&cli.conn)?;
    let api = Api::connect(&settings)?;
    match &cli.command {
        Command::Create(a) => vm::create(&api, a).await,
        Command::Boot(_)
        | Command::Pause(_)
        | Command::Resume(_)
        | Command::Reboot(_)
        | Command::Shutdown(_) => vm::lifecycle(&api, &cli.command).await,
        Command::Delete(a) => vm::delete(&api, a).await,
        Command::Info(a) => vm::info(&api, a).await,
        Command::List(a) => list::render(&api, a).await,
        Command::Watch(a) => list::watch(&api, a).await.map(|()| String::new()),
        Command::Console(a) => console::run(&api, a).await.map(|()| String::new()),
        Command::Health => health::run(&api).await,
        Command::Completions(_) => Ok(String::new()),
    }
}

fn fail(e: &CliError) -> ! {
    eprintln!("{e}");
    std::process::exit(e.exit_code())
}

/// Help and version print as clap does; a command line that does not
/// parse becomes one `metaldctl: usage: …` line and exit status 2.
fn usage_exit(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    // clap's first paragraph says what is wrong (a list of missing
    // arguments is indented below its first line); usage and tips follow.
    let rendered = e.render().to_string();
    let paragraph: Vec<&str> = rendered
        .trim_start()
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let text = paragraph.join(" ");
    let message = text.strip_prefix("error: ").unwrap_or(&text);
    fail(&CliError::usage(format!(
        "{message} (see metaldctl --help)"
    )))
}
